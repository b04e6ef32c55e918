"""A minimal, real AiidaService on port 0 hosting several instances behind one port.

It answers search queries from a table, records every configure and revoke,
can push DataAccessStatus messages on an instance's Connect stream, and lets
tests await what it has seen. It is a test double of the device, not a mock of
gRPC: the marketplace talks to it over real channels.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc

DataAccess = aiida_pb2.DataAccess
INSTANCE_HEADER = "aiida-instance-id"


@dataclass
class Call:
    """One unary call the double received."""

    instance_id: str
    request: Any
    authorization: str


@dataclass
class AiidaDouble(aiida_pb2_grpc.AiidaServiceServicer):
    matches: dict[str, bool] = field(default_factory=dict)
    # What ConfigureDataAccess answers with (the reference AIIDA answers STATE_ACTIVE).
    configure_state: int = DataAccess.STATE_UNSPECIFIED
    configure_error: grpc.StatusCode | None = None
    configures: list[Call] = field(default_factory=list)
    revokes: list[Call] = field(default_factory=list)
    streams: dict[str, asyncio.Queue[aiida_pb2.ConnectResponse]] = field(default_factory=dict)
    opened: dict[str, int] = field(default_factory=dict)
    # An instance listed here answers a search query only once its event is set.
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Waits until `predicate()` holds (re-checked on every change the double sees)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    def connected(self, instance_id: str) -> bool:
        return instance_id in self.streams

    def configured(self, instance_id: str) -> list[aiida_pb2.DataAccess]:
        return [c.request.data_access for c in self.configures if c.instance_id == instance_id]

    async def push_status(self, instance_id: str, permission_id: str, state: int, reason: str = "") -> None:
        status = aiida_pb2.DataAccessStatus(permission_id=permission_id, state=state, reason=reason)  # type: ignore[arg-type]
        await self.streams[instance_id].put(aiida_pb2.ConnectResponse(data_access_status=status))

    # --- the service ---

    async def Connect(self, request_iterator: Any, context: Any) -> AsyncIterator[aiida_pb2.ConnectResponse]:  # type: ignore[override]
        instance_id = dict(context.invocation_metadata()).get(INSTANCE_HEADER, "")
        outgoing: asyncio.Queue[aiida_pb2.ConnectResponse] = asyncio.Queue()
        reader = asyncio.create_task(self._answer(instance_id, request_iterator, outgoing))
        self.streams[instance_id] = outgoing
        self.opened[instance_id] = self.opened.get(instance_id, 0) + 1
        await self._notify()
        try:
            while True:
                yield await outgoing.get()
        finally:
            reader.cancel()
            if self.streams.get(instance_id) is outgoing:
                del self.streams[instance_id]

    async def _answer(self, instance_id: str, requests: Any, outgoing: asyncio.Queue[Any]) -> None:
        async for request in requests:
            if request.HasField("ping"):
                await outgoing.put(
                    aiida_pb2.ConnectResponse(pong=aiida_pb2.Pong(sequence=request.ping.sequence))
                )
            elif request.HasField("search_query"):
                if instance_id in self.gates:
                    await self.gates[instance_id].wait()
                reply = aiida_pb2.MatchReply(
                    query_id=request.search_query.query_id, matched=self.matches.get(instance_id, False)
                )
                await outgoing.put(aiida_pb2.ConnectResponse(match_reply=reply))

    def _call(self, request: Any, context: Any) -> Call:
        metadata = dict(context.invocation_metadata())
        return Call(metadata.get(INSTANCE_HEADER, ""), request, metadata.get("authorization", ""))

    async def ConfigureDataAccess(self, request: Any, context: Any) -> aiida_pb2.DataAccess:
        self.configures.append(self._call(request, context))
        await self._notify()
        if self.configure_error is not None:
            await context.abort(self.configure_error, "refused by the double")
        return aiida_pb2.DataAccess(
            permission_id=request.data_access.permission_id, state=self.configure_state
        )  # type: ignore[arg-type]

    async def RevokeDataAccess(self, request: Any, context: Any) -> aiida_pb2.DataAccess:
        self.revokes.append(self._call(request, context))
        await self._notify()
        return aiida_pb2.DataAccess(
            permission_id=request.permission_id, state=DataAccess.STATE_REVOKED, state_reason=request.reason
        )


@dataclass
class RunningAiida:
    """The double's server; `restart` brings it back on the same port."""

    double: AiidaDouble
    port: int
    server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        aiida_pb2_grpc.add_AiidaServiceServicer_to_server(self.double, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None
            self.double.streams.clear()
            await self.double._notify()


async def start_aiida(double: AiidaDouble | None = None) -> RunningAiida:
    running = RunningAiida(double or AiidaDouble(), 0)
    await running.start()
    return running
