"""Calling any marketplace RPC generically (from its descriptor) and judging the outcome."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, identity_pb2, instance_pb2
from eddie_client.client import Session
from eddie_common.interceptors import error_info

SERVICES: list[tuple[ServiceDescriptor, str]] = [
    (identity_pb2.DESCRIPTOR.services_by_name["IdentityService"], "identity"),
    (instance_pb2.DESCRIPTOR.services_by_name["InstanceService"], "instances"),
    (data_request_pb2.DESCRIPTOR.services_by_name["DataRequestService"], "data_requests"),
    (access_pb2.DESCRIPTOR.services_by_name["AccessService"], "access"),
    (consent_pb2.DESCRIPTOR.services_by_name["ConsentService"], "consent"),
]
# Every marketplace RPC with the Session attribute holding its stub.
RPCS: list[tuple[MethodDescriptor, str]] = [(m, attr) for service, attr in SERVICES for m in service.methods]
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
CALL_TIMEOUT = 20.0
STREAM_IDLE = 0.1  # a server stream that sends nothing for this long is done for our purposes


@dataclass
class Outcome:
    responses: list[Message]
    error: grpc.aio.AioRpcError | None

    @property
    def label(self) -> str:
        if self.error is None:
            return "OK"
        info = error_info(self.error)
        return f"{self.error.code().name}/{info.reason}" if info else self.error.code().name


async def _drain(call: Any) -> list[Message]:
    """Reads a server stream to its end, or until it has been idle for STREAM_IDLE (then cancels it)."""
    responses: list[Message] = []
    while True:
        try:
            message = await asyncio.wait_for(call.read(), STREAM_IDLE)
        except TimeoutError:
            call.cancel()
            return responses
        if message is grpc.aio.EOF:
            return responses
        responses.append(message)


async def _write_all(call: Any, requests: list[Message]) -> None:
    try:
        for request in requests:
            await call.write(request)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the server ended the call early; its status is read afterwards


async def invoke(
    client: Session, method: MethodDescriptor, attr: str, requests: list[Message], metadata: Any
) -> Outcome:
    """Calls `method` through the generated stub with `requests` (one unless client-streaming)."""
    stub = getattr(getattr(client, attr), method.name)
    try:
        if not method.client_streaming and not method.server_streaming:
            return Outcome([await stub(requests[0], metadata=metadata, timeout=CALL_TIMEOUT)], None)
        if not method.client_streaming:
            call = stub(requests[0], metadata=metadata, timeout=CALL_TIMEOUT)
            return Outcome(await _drain(call), None)
        call = stub(metadata=metadata, timeout=CALL_TIMEOUT)
        # The server speaks first (Connect sends `ready`); waiting for that keeps our writes from
        # racing a refusal, which grpc's client reports as its own INTERNAL, hiding the real status.
        first = await asyncio.wait_for(call.read(), 2.0)
        if first is grpc.aio.EOF:
            return Outcome([], None)
        await _write_all(call, requests)
        return Outcome([first, *await _drain(call)], None)
    except grpc.aio.AioRpcError as exc:
        return Outcome([], exc)


def assert_acceptable(outcome: Outcome, what: str) -> None:
    """Success, or a canonical status other than INTERNAL/UNKNOWN with an ErrorInfo and no internals."""
    error = outcome.error
    if error is not None:
        assert error.code() not in FORBIDDEN, f"{what}: {error.code()} {error.details()}"
        assert_error_info(error, what)
    for response in outcome.responses:
        if isinstance(response, consent_pb2.ConnectResponse) and response.HasField("decision_error"):
            code = response.decision_error.code
            assert code not in (c.value[0] for c in FORBIDDEN), f"{what}: decision_error {response}"


def assert_error_info(error: grpc.aio.AioRpcError, what: str = "") -> None:
    info = error_info(error)
    assert info is not None, f"{what}: {error.code()} without ErrorInfo: {error.details()}"
    assert info.domain == "marketplace.eddie" and info.reason, f"{what}: {info}"
    assert "Traceback" not in (error.details() or "") and "<class" not in (error.details() or "")
