"""One long-lived `AiidaService.Connect` stream to one instance, kept up with backoff.

A link owns one long-lived task, the supervisor (connect, read, reconnect).
Writes go through a small bounded per-link backlog drained by a short-lived
writer that exists only while there is something to send, so a slow instance
never blocks a search or another instance. Queries are written pre-serialized.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from eddie.aiida.v1 import aiida_pb2
from eddie_common.logging import log_event

if TYPE_CHECKING:
    from marketplace_server.aiida.manager import ConnectionManager

log = logging.getLogger(__name__)

CONNECT_METHOD = "/eddie.aiida.v1.AiidaService/Connect"
SEND_QUEUE_SIZE = 64
# Unsolicited replies (unknown query ids, duplicates) tolerated per minute before the stream is dropped.
MAX_UNSOLICITED_PER_MINUTE = 600
_PING_PREFIX = aiida_pb2.ConnectRequest(ping=aiida_pb2.Ping(sequence=0))


def _identity(data: bytes) -> bytes:
    return data


class InstanceLink:
    """The marketplace's stream to one AIIDA instance."""

    def __init__(self, manager: ConnectionManager, instance_id: str, address: str) -> None:
        self.manager = manager
        self.instance_id = instance_id
        self.address = address
        self.connected = False
        self.last_seen = 0.0
        self._backlog: collections.deque[bytes] = collections.deque()
        self._call: Any = None
        self._supervisor: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._ping_seq = 0
        self._unsolicited = 0
        self._unsolicited_window = 0.0
        self._stopped = False
        self._flooded = False
        self.failed_attempts = 0  # connections in a row that failed or were cut: the backoff's exponent
        self._reconnect_now = asyncio.Event()

    # --- lifecycle ---

    def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name=f"link:{self.instance_id}")

    async def stop(self) -> None:
        self._stopped = True
        for task in (self._supervisor, self._writer):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._supervisor, self._writer):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def readdress(self, address: str) -> None:
        """The instance re-registered (maybe elsewhere): reconnect now."""
        self.address = address
        self._reconnect_now.set()
        if self._call is not None:
            self._call.cancel()

    # --- sending ---

    def send(self, payload: bytes) -> bool:
        """Queues a pre-serialized ConnectRequest; False when offline or the queue is full."""
        if not self.connected or len(self._backlog) >= SEND_QUEUE_SIZE:
            return False
        self._backlog.append(payload)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._drain(self._call))
        return True

    async def _drain(self, call: Any) -> None:
        backlog = self._backlog
        try:
            while backlog:
                await call.write(backlog.popleft())
        except Exception:
            backlog.clear()

    # --- the connection loop ---

    async def _supervise(self) -> None:
        while not self._stopped:
            opened = False
            try:
                opened = await self._run_once()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._stopped or (task is not None and task.cancelling()):
                    raise
                # grpc.aio raises CancelledError from a call this link cancelled itself (flooding,
                # re-addressed), not only when this task is cancelled: that call ended, reconnect.
                log_event(log, "aiida_stream_cancelled", logging.DEBUG, instance=self.instance_id)
            except Exception as exc:
                log_event(
                    log, "aiida_stream_error", logging.DEBUG, instance=self.instance_id, error=repr(exc)
                )
            finally:
                await self._on_disconnected()
            # A stream this link dropped for flooding does not count as a good connection: its
            # backoff keeps growing instead of restarting from the shortest delay.
            self.failed_attempts = 0 if opened and not self._flooded else self.failed_attempts + 1
            self._flooded = False
            delay = self.manager.reconnect_backoff.delay(self.failed_attempts + 1)
            self._reconnect_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconnect_now.wait(), delay)

    async def _run_once(self) -> bool:
        channel = self.manager.channel_for(self.address)
        metadata = self.manager.stream_metadata(self.instance_id)
        multi = channel.stream_stream(
            CONNECT_METHOD,
            request_serializer=_identity,
            response_deserializer=aiida_pb2.ConnectResponse.FromString,
        )
        async with self.manager.connect_slots:
            call = multi(metadata=metadata, wait_for_ready=False)
            self._call = call
            self._ping_seq += 1
            await call.write(
                aiida_pb2.ConnectRequest(ping=aiida_pb2.Ping(sequence=self._ping_seq)).SerializeToString()
            )
            first: Any = await asyncio.wait_for(call.read(), self.manager.connect_timeout)
        if first is grpc.aio.EOF:
            return False
        self._backlog.clear()
        self.connected = True
        await self.manager.on_link_up(self)
        self._handle(first)
        while True:
            message: Any = await call.read()
            if message is grpc.aio.EOF:
                return True
            self._handle(message)

    async def _on_disconnected(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._writer = None
        self._backlog.clear()
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self.connected:
            self.connected = False
            await self.manager.on_link_down(self)

    # --- receiving ---

    def _handle(self, message: aiida_pb2.ConnectResponse) -> None:
        self.last_seen = time.time()
        kind = message.WhichOneof("message")
        if kind == "match_reply":
            reply = message.match_reply
            if not self.manager.on_match_reply(self, reply.query_id, reply.matched):
                self._count_unsolicited()
        elif kind == "data_access_status":
            self.manager.on_status(self, message.data_access_status)
        elif kind == "pong":
            pass
        else:
            self._count_unsolicited()

    def _count_unsolicited(self) -> None:
        now = time.monotonic()
        if now - self._unsolicited_window > 60:
            self._unsolicited_window = now
            self._unsolicited = 0
        self._unsolicited += 1
        if self._unsolicited > MAX_UNSOLICITED_PER_MINUTE and self._call is not None:
            log_event(log, "aiida_stream_dropped", logging.WARNING, instance=self.instance_id, why="flooding")
            self._flooded = True
            self._call.cancel()

    def ping(self) -> None:
        self._ping_seq += 1
        self.send(aiida_pb2.ConnectRequest(ping=aiida_pb2.Ping(sequence=self._ping_seq)).SerializeToString())


Callback = Callable[..., Any]
