"""What a failed call to the marketplace tells the operator.

Both of the sink's calls to the marketplace (the signing keys, the end feed) wait for the channel
to connect (`wait_for_ready`). When nothing listens at the address, the keys fetch therefore ends
DEADLINE_EXCEEDED, which reads like a slow marketplace; and a stream that breaks ends UNAVAILABLE
with grpc's own wording. A channel that is not connected after such a failure means the marketplace
could not be reached: the log says so and names the address (and the cause grpc gives, such as
`Connection refused`). A deadline on a connected channel is the marketplace being slow: its code.
"""

from __future__ import annotations

import grpc

UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def describe_failure(error: BaseException, channel: grpc.aio.Channel, target: str) -> str:
    """One phrase for the log's `error=` field."""
    if not isinstance(error, grpc.RpcError):
        return str(error)
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    if code in UNREACHABLE_CODES and channel.get_state() != grpc.ChannelConnectivity.READY:
        return f"marketplace unreachable at {target}: {_cause(error, code)}"
    return code.name


def _cause(error: grpc.RpcError, code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "not connected before the deadline (connection refused, or nothing listening there?)"
    # "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect
    # to remote host: Connection refused": the last part is the cause.
    details = str(error.details() or "")  # type: ignore[attr-defined]
    cause = details.rsplit(": ", 1)[-1].strip()
    return cause or code.name
