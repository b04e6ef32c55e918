"""An AIIDA endpoint whose Connect behaviour the test scripts, per instance, down to the bytes.

One real grpc.aio server hosts several instances behind one port (routed by the
`aiida-instance-id` header, as a fleet simulator does, so they share the
marketplace's channel): honest ones answer every query from their script's
`matched`, hostile ones misbehave. `Connect` is registered as a raw handler whose
response serializer passes bytes through, so a script can put anything on the
wire, including bytes that are no `ConnectResponse` at all.

The server does not check the marketplace's token: it plays a device that talks
to whoever dials it, which is all these tests need.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from eddie.aiida.v1 import aiida_pb2
from eddie_common.serving import SERVER_OPTIONS

SERVICE = "eddie.aiida.v1.AiidaService"
INSTANCE_HEADER = "aiida-instance-id"
ConnectRequest = aiida_pb2.ConnectRequest
ConnectResponse = aiida_pb2.ConnectResponse


def reply(query_id: str, matched: bool) -> bytes:
    return ConnectResponse(
        match_reply=aiida_pb2.MatchReply(query_id=query_id, matched=matched)
    ).SerializeToString()


def pong(sequence: int) -> bytes:
    return ConnectResponse(pong=aiida_pb2.Pong(sequence=sequence)).SerializeToString()


def status(permission_id: str, state: int) -> bytes:
    message = aiida_pb2.DataAccessStatus(permission_id=permission_id, state=state)  # type: ignore[arg-type]
    return ConnectResponse(data_access_status=message).SerializeToString()


# Not a ConnectResponse: field 15 with wire type 7, which does not exist; every protobuf parser refuses it.
GARBAGE = b"\xff\xff\xff\xff\x0f" + bytes(range(256))


@dataclass
class Stream:
    """One open Connect stream as a script sees it."""

    instance_id: str
    outgoing: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(256))
    sent: int = 0  # messages handed to gRPC
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def send(self, payload: bytes) -> None:
        await self.outgoing.put(payload)


class Script:
    """An honest device: a pong per ping, one reply per query. Subclasses misbehave."""

    def __init__(self, matched: bool = True) -> None:
        self.matched = matched
        self.query_ids: list[str] = []

    async def opened(self, stream: Stream) -> None:
        """Runs when the stream opens, before the first request is read."""

    async def ping(self, stream: Stream, ping: aiida_pb2.Ping) -> None:
        await stream.send(pong(ping.sequence))

    async def query(self, stream: Stream, query: aiida_pb2.SearchQuery) -> None:
        """Runs in a task of its own per query, so a slow answer blocks nothing else."""
        await stream.send(reply(query.query_id, self.matched))


class Slow(Script):
    """Answers query number i after `delays[i]` seconds with `answers[i]` (the last entry repeats)."""

    def __init__(self, delays: list[float], answers: list[bool]) -> None:
        super().__init__()
        self.delays, self.answers = delays, answers
        self.replied: list[tuple[str, float]] = []  # (query id, monotonic time of the reply)

    async def query(self, stream: Stream, query: aiida_pb2.SearchQuery) -> None:
        n = len(self.query_ids) - 1
        await asyncio.sleep(self.delays[min(n, len(self.delays) - 1)])
        await stream.send(reply(query.query_id, self.answers[min(n, len(self.answers) - 1)]))
        self.replied.append((query.query_id, time.monotonic()))


class Silent(Script):
    """Keeps the stream up (pongs) and never answers a query."""

    async def query(self, stream: Stream, query: aiida_pb2.SearchQuery) -> None:
        return


class WrongIds(Script):
    """Answers every query with `matched=True` replies under every id but the right one."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_ids: list[str] = []

    async def query(self, stream: Stream, query: aiida_pb2.SearchQuery) -> None:
        ids = [
            "",
            secrets.token_hex(8),
            query.query_id.upper(),  # ids are compared exactly
            query.query_id + "0",
            query.query_id[:-1],
            "x" * 4096,
            *self.query_ids[:-1],  # earlier, finished searches
        ]
        for query_id in ids:
            await stream.send(reply(query_id, True))
            self.sent_ids.append(query_id)


class Flood(Script):
    """From the moment the stream opens, writes unsolicited messages as fast as gRPC takes them.

    Unknown-id match replies and messages with no field set alternate; a query is
    answered once (the real answer), then the flood goes on.
    """

    async def opened(self, stream: Stream) -> None:
        empty = ConnectResponse().SerializeToString()
        while True:
            await stream.send(reply(secrets.token_hex(8), True))
            await stream.send(empty)


class StatusFlood(Script):
    """Answers queries honestly, and floods "active" statuses about permissions it was never given."""

    def __init__(self, permission_ids: list[str], matched: bool = True) -> None:
        super().__init__(matched)
        self.permission_ids = permission_ids

    async def opened(self, stream: Stream) -> None:
        for permission_id in self.permission_ids:
            await stream.send(status(permission_id, aiida_pb2.DataAccess.STATE_ACTIVE))


class Garbage(Script):
    """Answers the first query with bytes that are no ConnectResponse (or `payload`)."""

    def __init__(self, payload: bytes = GARBAGE, on_open: bool = False) -> None:
        super().__init__()
        self.payload = payload
        self.on_open = on_open

    async def opened(self, stream: Stream) -> None:
        if self.on_open:
            await stream.send(self.payload)

    async def ping(self, stream: Stream, ping: aiida_pb2.Ping) -> None:
        if not self.on_open:
            await stream.send(pong(ping.sequence))

    async def query(self, stream: Stream, query: aiida_pb2.SearchQuery) -> None:
        await stream.send(self.payload)


class HostileAiida:
    """A real AiidaService Connect endpoint on port 0; unknown instance ids get an honest Script."""

    def __init__(self, scripts: dict[str, Script] | None = None) -> None:
        self.scripts: dict[str, Script] = dict(scripts or {})
        self.opened: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.streams: dict[str, Stream] = {}
        self.history: dict[str, list[Stream]] = {}
        self.configured: list[str] = []  # permission ids of ConfigureDataAccess calls, in order
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> HostileAiida:
        server = grpc.aio.server(options=SERVER_OPTIONS)  # a real AIIDA's keepalive policy
        connect = grpc.stream_stream_rpc_method_handler(
            self._connect,
            request_deserializer=ConnectRequest.FromString,
            response_serializer=_identity,  # scripts hand over bytes, checked by nobody
        )
        unary = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(self, f"_{name}"),
                request_deserializer=request.FromString,
                response_serializer=aiida_pb2.DataAccess.SerializeToString,
            )
            for name, request in (
                ("ConfigureDataAccess", aiida_pb2.ConfigureDataAccessRequest),
                ("RevokeDataAccess", aiida_pb2.RevokeDataAccessRequest),
            )
        }
        handler = grpc.method_handlers_generic_handler(SERVICE, {"Connect": connect, **unary})
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self.server = server
        return self

    async def stop(self, grace: float | None = 0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None

    def connected(self, instance_id: str) -> bool:
        stream = self.streams.get(instance_id)
        return stream is not None and not stream.ended.is_set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached within {timeout}s: {what or predicate}")
            await asyncio.sleep(0.01)

    async def _connect(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        instance_id = dict(context.invocation_metadata()).get(INSTANCE_HEADER, "")
        script = self.scripts.setdefault(instance_id, Script())
        stream = Stream(instance_id)
        self.opened[instance_id] += 1
        self.streams[instance_id] = stream
        self.history.setdefault(instance_id, []).append(stream)
        stream.tasks.add(asyncio.create_task(script.opened(stream)))
        stream.tasks.add(asyncio.create_task(self._read(requests, stream, script)))
        try:
            while True:
                payload = await stream.outgoing.get()
                yield payload
                stream.sent += 1
        finally:
            stream.ended.set()
            self.closed[instance_id] += 1
            for task in stream.tasks:
                task.cancel()

    async def _ConfigureDataAccess(
        self, request: aiida_pb2.ConfigureDataAccessRequest, context: Any
    ) -> aiida_pb2.DataAccess:
        """Accepts; the state is left for the script to report on the stream."""
        self.configured.append(request.data_access.permission_id)
        return aiida_pb2.DataAccess(permission_id=request.data_access.permission_id)

    async def _RevokeDataAccess(
        self, request: aiida_pb2.RevokeDataAccessRequest, context: Any
    ) -> aiida_pb2.DataAccess:
        return aiida_pb2.DataAccess(
            permission_id=request.permission_id, state=aiida_pb2.DataAccess.STATE_REVOKED
        )

    async def _read(self, requests: AsyncIterator[Any], stream: Stream, script: Script) -> None:
        async for request in requests:
            kind = request.WhichOneof("message")
            if kind == "ping":
                await script.ping(stream, request.ping)
            elif kind == "search_query":
                script.query_ids.append(request.search_query.query_id)
                task = asyncio.create_task(script.query(stream, request.search_query))
                stream.tasks.add(task)
                task.add_done_callback(stream.tasks.discard)


def _identity(data: bytes) -> bytes:
    return data
