"""What can go wrong in a command, as one readable line and an exit status (never a traceback).

Exit statuses: 0 done; 1 the marketplace refused the call (or a check failed, e.g. a broken
receipt chain); 2 bad usage (Click's own); 3 the marketplace cannot be reached; 4 not signed in
(or the session expired); 130 interrupted.
"""

from __future__ import annotations

import grpc

from eddie_common.interceptors import bad_request, error_info

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_SIGNED_OUT = 4
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to report on stderr as `error: <message>` with exit status `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class Unreachable(CliError):
    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"cannot reach the marketplace at {address}: {detail}", EXIT_UNREACHABLE)


class SignedOut(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_SIGNED_OUT)


def describe_rpc_error(error: grpc.aio.AioRpcError) -> str:
    """`NOT_FOUND (DATA_REQUEST_NOT_FOUND): data request not found` from a failed call."""
    info = error_info(error)
    reason = f" ({info.reason})" if info is not None and info.reason else ""
    details = (error.details() or "").strip()
    first_line = details.splitlines()[0] if details else "no details"
    fields = bad_request(error)
    violations = "; ".join(f"{v.field}: {v.description}" for v in fields.field_violations) if fields else ""
    if violations and violations not in first_line:
        first_line = f"{first_line} [{violations}]"
    return f"{error.code().name}{reason}: {first_line}"


def from_rpc_error(error: grpc.aio.AioRpcError, address: str) -> CliError:
    """The CliError a failed call turns into, with the exit status its kind deserves."""
    code = error.code()
    text = describe_rpc_error(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return CliError(f"{text} (marketplace {address})", EXIT_UNREACHABLE)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        info = error_info(error)
        if info is not None and info.reason == "INVALID_CREDENTIALS":
            return SignedOut(text)  # a failed `eddie login` itself: "sign in again" would go in a circle
        return SignedOut(f"{text}; sign in again with `eddie login`")
    return CliError(text)
