"""One long-lived `AiidaService.Connect` stream to one instance, kept up with backoff.

A link's supervisor task opens the stream (connect, backoff, retry) and ends
once it is open: reads, like writes, are then driven by their completion
callbacks, so thousands of open streams hold no task each; when the stream
ends, a new supervisor reports it down and reconnects. Writes go through a
small bounded per-link backlog, so a slow instance never blocks a search or
another instance. Queries are written pre-serialized, and the fan-out starts a
write inline (grpc hands the message to its core at once); its completion
callback finishes it and starts the next queued one. A search thus costs no
task, timer or event-loop round per instance on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

import grpc

from eddie.aiida.v1 import aiida_pb2
from eddie_common.logging import log_event
from eddie_common.retry import Backoff

log = logging.getLogger(__name__)

# The (empty) context the read callbacks of every open stream run in: a link acts for the
# marketplace, and a context per pending read would cost each open stream one more object.
_READ_CONTEXT = contextvars.Context()

CONNECT_METHOD = "/eddie.aiida.v1.AiidaService/Connect"
SEND_QUEUE_SIZE = 64
# Unsolicited replies (unknown query ids, duplicates) tolerated per minute before the stream is dropped.
MAX_UNSOLICITED_PER_MINUTE = 600


class LinkHost(Protocol):
    """What a link needs from the connection manager that owns it."""

    reconnect_backoff: Backoff
    connect_timeout: float
    connect_slots: asyncio.Semaphore

    def connect_method_for(self, address: str) -> Any: ...

    def stream_metadata(self, instance_id: str) -> tuple[tuple[str, str], ...]: ...

    async def on_link_up(self, link: InstanceLink) -> None: ...

    async def on_link_down(self, link: InstanceLink) -> None: ...

    def on_match_reply(self, link: InstanceLink, query_id: str, matched: bool) -> bool: ...

    def on_status(self, link: InstanceLink, status: aiida_pb2.DataAccessStatus) -> None: ...


class InstanceLink:
    """The marketplace's stream to one AIIDA instance.

    Thousands live for hours, so a link is slotted and holds no object it does not need
    while idle (an empty list for the backlog, a wake-up future only while backing off).
    """

    __slots__ = (
        "_backlog",
        "_call",
        "_core",
        "_flooded",
        "_opening",
        "_ping_seq",
        "_read_waits_on",
        "_reading",
        "_stopped",
        "_supervisor",
        "_unsolicited",
        "_unsolicited_window",
        "_wake",
        "_write_waits_on",
        "_writing",
        "address",
        "connected",
        "failed_attempts",
        "instance_id",
        "last_seen",
        "manager",
        "written",
    )

    def __init__(self, manager: LinkHost, instance_id: str, address: str) -> None:
        self.manager = manager
        self.instance_id = instance_id
        self.address = address
        self.connected = False
        self.last_seen = 0.0
        self.written = 0.0  # the last_seen last queued for the database (manager._ping_forever)
        self._backlog: list[bytes] = []
        self._call: Any = None
        self._core: Any = None  # the open call's message I/O (`_core_of`)
        self._supervisor: asyncio.Task[None] | None = None
        # The write in progress (a coroutine of `_core`'s) and the future it waits on.
        self._writing: Coroutine[Any, Any, None] | None = None
        self._write_waits_on: asyncio.Future[Any] | None = None
        # The read in progress while the stream is open (a coroutine of `_core`'s) and the future it
        # waits on: reads are driven by callbacks as writes are, so an open stream has no task.
        self._reading: Coroutine[Any, Any, Any] | None = None
        self._read_waits_on: asyncio.Future[Any] | None = None
        self._ping_seq = 0
        self._unsolicited = 0
        self._unsolicited_window = 0.0
        self._stopped = False
        self._flooded = False
        self.failed_attempts = 0  # connections in a row that failed or were cut: the backoff's exponent
        self._wake: asyncio.Future[None] | None = None
        self._opening: asyncio.Timeout | None = None  # bounds `_open` while it waits for the pong

    # --- lifecycle ---

    def start(self, stream_ended: bool = False) -> None:
        # A fresh, empty context: a link is usually started inside the RPC that claimed or
        # registered its instance, and a task copies the context it is created in, which would keep
        # that caller (its Principal and the context's nodes) alive as long as the link runs, and
        # let it leak into what the link does. The link acts for the marketplace, not the caller.
        context = contextvars.Context()
        self._supervisor = task = asyncio.create_task(
            self._supervise(stream_ended), name=f"link:{self.instance_id}", context=context
        )
        task.add_done_callback(self._supervisor_ended, context=context)  # (None would copy the caller's)

    def _supervisor_ended(self, task: asyncio.Task[None]) -> None:
        """A supervisor ends when its stream is open (reading needs no task) or the link is stopped;
        one that died is logged and restarted, or the instance would stay unreachable for good (a
        later re-registration finds no one to wake)."""
        if self._supervisor is task:
            self._supervisor = None  # an open stream's link keeps no finished task (its name, its context)
        if self._stopped or task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        log.error("aiida_link_supervisor_died", exc_info=exc, extra={"instance": self.instance_id})
        self.connected = False
        self._call = self._core = None
        self.start()

    async def stop(self) -> None:
        self._stopped = True
        self._abandon_writes()
        self._abandon_read()
        task = self._supervisor
        if task is not None:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._on_disconnected()  # an open stream has no supervisor to do it

    def readdress(self, address: str) -> None:
        """The instance re-registered (maybe elsewhere): reconnect now."""
        self.address = address
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        if self._opening is not None:
            # A call cancelled before its first write got out leaves that write waiting until the
            # connect timeout (30 s): the opening ends now instead, and the link retries at once.
            self._opening.reschedule(asyncio.get_running_loop().time())
        if self._call is not None:
            self._call.cancel()

    # --- sending ---

    def send(self, payload: bytes) -> bool:
        """Sends a pre-serialized ConnectRequest, or queues it behind the write in progress.

        False when offline or the queue is full.
        """
        if not self.connected or len(self._backlog) >= SEND_QUEUE_SIZE:
            return False
        if self._writing is None:
            self._writing = self._core.send_serialized_message(payload)
            self._advance_write(None)
        else:
            self._backlog.append(payload)
        return True

    def _advance_write(self, done: asyncio.Future[Any] | None) -> None:
        """Runs the write in progress up to its next wait (what a task's step would do).

        `done` is the future whose completion called us; a callback left over from a write
        that was abandoned (the stream broke) finds another future pending and does nothing.
        """
        if _stale(done, self._write_waits_on):
            return
        writing = self._writing
        while writing is not None:
            try:
                waits_on = writing.send(None)
            except StopIteration:  # written; start the next queued message, if any
                backlog = self._backlog
                writing = self._writing = (
                    self._core.send_serialized_message(backlog.pop(0)) if backlog else None
                )
                continue
            except (Exception, asyncio.CancelledError):  # the stream broke; the reader sees it end
                self._writing = self._write_waits_on = None
                self._backlog.clear()
                if self._call is not None:
                    self._call.cancel()  # (grpc.aio's write would have failed the call; the read then ends)
                return
            self._write_waits_on = _resume_when(waits_on, self._advance_write)
            return
        self._write_waits_on = None

    def _abandon_writes(self) -> None:
        writing, self._writing, self._write_waits_on = self._writing, None, None
        self._backlog.clear()
        if writing is not None:
            writing.close()

    # --- the connection loop ---

    async def _supervise(self, stream_ended: bool = False) -> None:
        """Opens the stream, retrying with backoff, and returns once it is open: reading then goes
        on without a task (`_advance_read`), and a new supervisor starts when the stream ends
        (`stream_ended`: a stream that was open ended, or was cut)."""
        if stream_ended:
            await self._on_disconnected()
            # A stream this link dropped for flooding does not count as a good connection: its
            # backoff keeps growing instead of restarting from the shortest delay.
            self.failed_attempts = self.failed_attempts + 1 if self._flooded else 0
            self._flooded = False
            await self._back_off(self.manager.reconnect_backoff.delay(self.failed_attempts + 1))
        while not self._stopped:
            opened = False
            try:
                opened = await self._open()
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
                if not opened:
                    await self._on_disconnected()
            if opened:
                return
            self.failed_attempts += 1
            self._flooded = False
            await self._back_off(self.manager.reconnect_backoff.delay(self.failed_attempts + 1))

    async def _back_off(self, delay: float) -> None:
        """Waits `delay` seconds, or less if the instance re-registers meanwhile."""
        self._wake = asyncio.get_running_loop().create_future()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake
        finally:
            self._wake = None

    async def _open(self) -> bool:
        """Opens the stream (a ping and its pong) and starts reading; False if it ended at once."""
        async with self.manager.connect_slots:
            # The token is signed once a slot is free: after a restart 10,000 links start at once,
            # and signing every token before the first stream opens held them all back ~0.3 s.
            connect = self.manager.connect_method_for(self.address)
            call = connect(metadata=self.manager.stream_metadata(self.instance_id), wait_for_ready=False)
            self._call = call
            self._ping_seq += 1
            # The first write is bounded too: grpc.aio's write waits for the call's initial metadata
            # to be sent, and a call cancelled before that (re-addressed while connecting) or one to a
            # peer that never completes the HTTP/2 handshake leaves it waiting for good.
            try:
                async with asyncio.timeout(self.manager.connect_timeout) as self._opening:
                    await call.write(
                        aiida_pb2.ConnectRequest(
                            ping=aiida_pb2.Ping(sequence=self._ping_seq)
                        ).SerializeToString()
                    )
                    first: Any = await call.read()
            finally:
                self._opening = None
        if first is grpc.aio.EOF:
            return False
        # The stream is open and its token sent. grpc.aio's call keeps its Python copy of the
        # call metadata only to start the call; dropped, each connected instance costs ~0.6 KiB
        # less (the token is ~450 characters). An attribute grpc renames only stops the saving.
        call._metadata = ()
        self._core = _core_of(call)
        self._backlog.clear()
        self.connected = True
        await self.manager.on_link_up(self)
        self._handle(first)
        if self._call is call and not self._stopped:
            self._reading = self._core.receive_serialized_message()
            self._advance_read(None)
        return True

    def _advance_read(self, done: asyncio.Future[Any] | None) -> None:
        """Runs the read in progress up to its next wait, handles what it read and starts the next
        read (what the reading task's step would do, without a task per open stream).

        `done` is the future whose completion called us; a callback left over from a read that
        was abandoned (the link stopped) finds another future pending and does nothing.
        """
        if _stale(done, self._read_waits_on):
            return
        reading = self._reading
        while reading is not None:
            try:
                waits_on = reading.send(None)
            except StopIteration as read:
                if read.value is grpc.aio.EOF:
                    self._stream_ended()
                    return
                try:
                    self._handle(_parse(read.value))
                except Exception as exc:  # a reply that did not parse: the stream is dropped
                    log_event(
                        log, "aiida_stream_error", logging.DEBUG, instance=self.instance_id, error=repr(exc)
                    )
                    self._stream_ended()
                    return
                if self._reading is not reading:  # abandoned meanwhile
                    return
                reading = self._reading = self._core.receive_serialized_message()
                continue
            except (Exception, asyncio.CancelledError) as exc:  # the stream broke, or was cancelled
                log_event(
                    log, "aiida_stream_ended", logging.DEBUG, instance=self.instance_id, error=repr(exc)
                )
                self._stream_ended()
                return
            self._read_waits_on = _resume_when(waits_on, self._advance_read, _READ_CONTEXT)
            return
        self._read_waits_on = None

    def _stream_ended(self) -> None:
        """The open stream ended: a new supervisor reports it down and reconnects."""
        self._reading = self._read_waits_on = None
        if not self._stopped:
            self.start(stream_ended=True)

    def _abandon_read(self) -> None:
        reading, self._reading, self._read_waits_on = self._reading, None, None
        if reading is not None:
            reading.close()

    async def _on_disconnected(self) -> None:
        self._abandon_writes()
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._core = None
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


# The open stream's message I/O. grpc.aio's `write` and `read` each wrap the core call's own
# coroutine in two more (style checks, the call's preparation, (de)serialization); once the stream is
# open (its first write and read done) those checks have nothing left to do, and the queries are
# already serialized. Driving the core call's coroutines directly saves four coroutine objects per
# instance per search and two per idle stream (the pending read). Measured on the floor's own
# round trips at 10,000 streams: 64-65 -> 53-58 us of CPU per stream; in the bench, 34.2 -> 32.2 KiB
# per connected AIIDA after claiming. grpcio is pinned; should a release rename these, the public
# calls are used instead (a test runs both).


def _core_of(call: Any) -> Any:
    """What a link reads and writes the open `call` through: grpc.aio's core call, or the call's
    public `write`/`read` (`_PublicIO`) where the core call is not found."""
    core = getattr(call, "_cython_call", None)
    if callable(getattr(core, "send_serialized_message", None)) and callable(
        getattr(core, "receive_serialized_message", None)
    ):
        return core
    return _PublicIO(call)


class _PublicIO:
    """The open call's public API under the core call's method names."""

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    def send_serialized_message(self, payload: bytes) -> Coroutine[Any, Any, None]:
        return cast("Coroutine[Any, Any, None]", self._call.write(payload))

    def receive_serialized_message(self) -> Coroutine[Any, Any, Any]:
        return cast("Coroutine[Any, Any, Any]", self._call.read())


def _parse(read: Any) -> aiida_pb2.ConnectResponse:
    """A reply as the core call hands it (bytes), or as grpc.aio's `read` does (parsed, or None
    when it did not parse)."""
    if isinstance(read, bytes):
        return aiida_pb2.ConnectResponse.FromString(read)
    if read is None:
        raise ValueError("the reply is not a ConnectResponse")
    return cast("aiida_pb2.ConnectResponse", read)


# What a task's step does with the coroutine it drives, for the read and write drivers above.


def _stale(done: asyncio.Future[Any] | None, waiting_on: asyncio.Future[Any] | None) -> bool:
    """Whether a driver's callback comes from a step that was abandoned (the stream broke or the
    link stopped): `done`, the future that called it, is not the one the driver waits on now."""
    if done is waiting_on:
        return False
    if done is not None and not done.cancelled():
        done.exception()  # an abandoned step's failure: retrieved, or asyncio logs it at exit
    return True


def _resume_when(
    waits_on: Any,
    resume: Callable[[asyncio.Future[Any] | None], None],
    context: contextvars.Context | None = None,
) -> asyncio.Future[Any] | None:
    """Arranges for `resume` to run when the future a coroutine step yielded completes, or on the
    next loop iteration for a bare yield (None); returns the future the driver now waits on."""
    if waits_on is None:
        asyncio.get_running_loop().call_soon(resume, None, context=context)
        return None
    waits_on._asyncio_future_blocking = False
    waits_on.add_done_callback(resume, context=context)
    return cast("asyncio.Future[Any]", waits_on)
