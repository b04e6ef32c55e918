"""Streams one active data access's simulated readings to the eligible party's sink.

The simulated clock of an access starts at its `start_time` when the access is
configured and runs `time_scale` times faster than the wall clock. The
cumulative registers at `start_time` (the baseline of the first interval) are
sent at once; then, whenever an interval of the access's granularity has passed
on that clock, its readings are generated and written to a long-lived
`DataSinkService.Publish` stream. The
stream is closed every `CHECKPOINT_SECONDS` (and before long idle waits) to get
the sink's acknowledgement; only then does the access's cursor advance, so a
restart or a broken stream re-sends at most the unacknowledged readings
(at-least-once; the sink stores each (permission, tag, time) once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import timestamp_pb2

from aiida_stub.meter import Meter, MeterReading
from aiida_stub.profile import Source
from aiida_stub.state import AccessRecord, StateValue
from eddie.aiida.v1 import aiida_pb2
from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie_common.channels import dial
from eddie_common.logging import log_event
from eddie_common.retry import Backoff, retry_log_level

log = logging.getLogger(__name__)

State = aiida_pb2.DataAccess.State
BACKLOG_LIMIT = 10_000  # readings kept while the sink is away; the oldest are dropped beyond
CHECKPOINT_SECONDS = 5.0  # close the stream for an acknowledgement at least this often
CHECKPOINT_READINGS = 5_000
GENERATE_BATCH = 2_000  # readings generated between two yields to the event loop
AUTH_FAILURES_ALLOWED = 3  # consecutive UNAUTHENTICATED/PERMISSION_DENIED before STATE_FAILED
END_GRACE_SECONDS = 60.0  # how long undelivered readings are retried after the window ended
STOP_TIMEOUT_SECONDS = 0.8
CLOSE_TIMEOUT_SECONDS = 0.3
STATUS_SETTLE_POLLS = 10  # x 20 ms
_PERMANENT = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class StreamPlan:
    """What to send for one access: the source, its tags, and the granularity."""

    source: Source
    tags: tuple[str, ...]
    granularity_us: int


@dataclass(frozen=True)
class SimClock:
    """The simulated time of an access: `start + (now - configured_at) * time_scale`."""

    time_scale: float

    def sim_now_us(self, access: AccessRecord) -> int:
        elapsed = max(0, time.time_ns() // 1000 - access.configured_at_us)
        return access.start_us + int(elapsed * self.time_scale)

    def seconds_until(self, access: AccessRecord, sim_us: int) -> float:
        return max(0.0, (sim_us - self.sim_now_us(access)) / self.time_scale / 1e6)


class SinkChannels:
    """One channel per sink address, shared by every access that streams there."""

    def __init__(self, sink_ca: bytes | None = None) -> None:
        self.sink_ca = sink_ca  # also trusted for mqtts:// brokers
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, sink_uri: str) -> data_sink_pb2_grpc.DataSinkServiceAsyncStub:
        channel = self._channels.get(sink_uri)
        if channel is None:
            scheme, _, target = sink_uri.partition("://")
            tls = grpc.ssl_channel_credentials(self.sink_ca) if scheme == "grpcs" else None
            channel = self._channels[sink_uri] = dial(target, tls)
        return data_sink_pb2_grpc.DataSinkServiceStub(channel)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


class SinkFailed(Exception):
    """A delivery failed with the sink's (or the transport's) status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


def _to_proto(permission_id: str, reading: MeterReading) -> data_sink_pb2.PublishRequest:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(reading.time_us)
    return data_sink_pb2.PublishRequest(
        reading=energy_pb2.Reading(
            permission_id=permission_id, data_tag=reading.tag, value=reading.value, unit=reading.unit, time=ts
        )
    )


@dataclass
class StreamStats:
    """What the streamers of one process delivered (read by the metrics at scrape time)."""

    published: int = 0  # readings acknowledged by sinks
    dropped: int = 0  # readings lost to a full backlog
    failures: Counter[str] = field(default_factory=Counter)  # failed deliveries by gRPC status


class AccessStreamer:
    """The task that delivers one access's readings until its window ends, it fails, or it is stopped."""

    def __init__(
        self,
        access: AccessRecord,
        plan: StreamPlan,
        meter: Meter,
        channels: SinkChannels,
        clock: SimClock,
        *,
        on_progress: Callable[[], None],
        on_finished: Callable[[StateValue, str], None],
        backoff: Backoff,
        stats: StreamStats | None = None,
    ) -> None:
        self.access = access
        self._stats = StreamStats() if stats is None else stats
        self.plan = plan
        self._meter = meter
        self._channels = channels
        self._clock = clock
        self._on_progress = on_progress
        self._on_finished = on_finished
        self._backoff = backoff
        self._backlog: deque[MeterReading] = deque()
        self._written = 0  # readings of the backlog written on the current stream
        self._dropped = 0
        self._failures = 0  # consecutive failed deliveries; reset by an acknowledgement
        self._auth_failures = 0
        self._next_us = max(access.cursor_us, access.start_us)  # start of the next interval to generate
        self._opening_due = access.cursor_us == 0  # the registers at start_time, sent right away
        self._call: (
            grpc.aio.StreamUnaryCall[data_sink_pb2.PublishRequest, data_sink_pb2.PublishResponse] | None
        )
        self._call = None
        self._opened_at = 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"stream-{self.access.permission_id}"
        )

    async def stop(self) -> None:
        """Stops sending within about a second (the current stream is closed, not the access)."""
        self._stop.set()
        task = self._task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        try:
            state, reason = await self._stream()
        except Stopped:
            return
        except Exception:
            log.exception("streamer_failed", extra={"permission": self.access.permission_id})
            state, reason = State.STATE_FAILED, "internal error while streaming"
        finally:
            await self._close_call()
        if not self._stop.is_set():
            self._on_finished(state, reason)

    async def _stream(self) -> tuple[StateValue, str]:
        while True:
            await self._generate()
            if not self._backlog and self._next_us >= self.access.end_us:
                return State.STATE_FULFILLED, "the access's time window ended"
            try:
                await self._deliver()
            except SinkFailed as failure:
                await self._reset_transport()
                self._stats.failures[failure.code.name] += 1
                self._failures += 1
                self._auth_failures = self._auth_failures + 1 if failure.code in _PERMANENT else 0
                if self._auth_failures >= AUTH_FAILURES_ALLOWED:
                    return State.STATE_FAILED, f"the sink refused the readings ({failure.code.name})"
                if self._past_end_grace():
                    undelivered = len(self._backlog)
                    return State.STATE_FAILED, f"the sink was unreachable; {undelivered} readings undelivered"
                delay = self._backoff.delay(self._failures)
                log_event(
                    log,
                    "sink_retry",
                    retry_log_level(self._failures),
                    permission=self.access.permission_id,
                    error=str(failure),
                    attempt=self._failures,
                    retry_in=round(delay, 2),
                )
                await self._sleep(delay)

    async def _reset_transport(self) -> None:
        """Forgets the broken stream (the next delivery opens a new one)."""
        self._call, self._written = None, 0

    async def _deliver(self) -> None:
        """Writes what is due, checkpoints when it is time, else waits for the next interval."""
        if self._written < len(self._backlog):
            await self._write_pending()
        window_over = self._next_us >= self.access.end_us
        wait = 0.0 if window_over else self._clock.seconds_until(self.access, self._next_interval_end())
        if self._call is not None and (
            window_over
            or self._written >= CHECKPOINT_READINGS
            or time.monotonic() - self._opened_at >= CHECKPOINT_SECONDS
            or wait >= CHECKPOINT_SECONDS
        ):
            await self._checkpoint()
        elif not window_over:
            await self._sleep(wait)

    def _next_interval_end(self) -> int:
        return min(self._next_us + self.plan.granularity_us, self.access.end_us)

    async def _generate(self) -> None:
        """Adds every reading whose interval has passed on the simulated clock to the backlog."""
        if self._opening_due:
            self._opening_due = False
            opening = self._meter.opening_readings(self.plan.source, self.plan.tags, self.access.start_us)
            self._backlog.extend(opening)
        g, end = self.plan.granularity_us, self.access.end_us
        sim_now = self._clock.sim_now_us(self.access)
        due_end = end if sim_now >= end else self._next_us + max(0, sim_now - self._next_us) // g * g
        per_interval = len(self.plan.tags)
        skip = (due_end - self._next_us) // g - BACKLOG_LIMIT // per_interval
        if skip > 0:  # far behind (e.g. after a long outage): only the newest BACKLOG_LIMIT can be kept
            self._note_dropped(skip * per_interval)
            self._next_us += skip * g
        while self._next_us < due_end:
            batch_end = min(due_end, self._next_us + max(1, GENERATE_BATCH // per_interval) * g)
            for reading in self._meter.readings(
                self.plan.source, self.plan.tags, self._next_us, batch_end, g
            ):
                self._backlog.append(reading)
            self._next_us = batch_end
            overflow = len(self._backlog) - BACKLOG_LIMIT
            for _ in range(max(0, overflow)):
                self._backlog.popleft()
                self._written = max(0, self._written - 1)
            if overflow > 0:
                self._note_dropped(overflow)
            if self._next_us < due_end:
                await asyncio.sleep(0)

    def _note_dropped(self, count: int) -> None:
        if self._dropped == 0:
            log_event(
                log,
                "backlog_full",
                logging.WARNING,
                permission=self.access.permission_id,
                limit=BACKLOG_LIMIT,
            )
        self._dropped += count
        self._stats.dropped += count

    async def _write_pending(self) -> None:
        call = self._call
        if call is None:
            metadata = (("authorization", f"Bearer {self.access.sink_token}"),)
            call = self._call = self._channels.stub(self.access.sink_uri).Publish(metadata=metadata)
            self._opened_at, self._written = time.monotonic(), 0
        pid = self.access.permission_id
        try:
            while self._written < len(self._backlog):
                if self._stop.is_set():
                    raise Stopped
                await call.write(_to_proto(pid, self._backlog[self._written]))
                self._written += 1
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            raise await self._failure(call) from None

    async def _checkpoint(self) -> None:
        call, self._call = self._call, None
        assert call is not None
        try:
            await call.done_writing()
            await call
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            raise await self._failure(call) from None
        acked = self._written
        self._stats.published += acked
        last = self._backlog[acked - 1] if acked else None
        for _ in range(acked):
            self._backlog.popleft()
        self._written = self._failures = self._auth_failures = 0
        if last is not None:
            self.access.cursor_us = last.time_us
            self._on_progress()
        self._report_dropped()

    def _report_dropped(self) -> None:
        """Logs how many readings the full backlog dropped since the last acknowledgement."""
        if self._dropped:
            log_event(
                log,
                "readings_dropped",
                logging.WARNING,
                permission=self.access.permission_id,
                count=self._dropped,
            )
            self._dropped = 0

    async def _failure(self, call: grpc.aio.Call) -> SinkFailed:
        """The sink's status. A write that raced the sink's own status reads INTERNAL until it lands."""
        try:
            code = await call.code()
            for _ in range(STATUS_SETTLE_POLLS):
                if code != grpc.StatusCode.INTERNAL:
                    break
                await asyncio.sleep(0.02)
                code = await call.code()
            details = await call.details()
        except Exception:
            code, details = grpc.StatusCode.UNAVAILABLE, "stream broken"
        return SinkFailed(code, details or "")

    def _past_end_grace(self) -> bool:
        if self._next_us < self.access.end_us:
            return False
        end_wall_s = self.access.configured_at_us / 1e6 + (
            (self.access.end_us - self.access.start_us) / 1e6 / self._clock.time_scale
        )
        return time.time() > end_wall_s + END_GRACE_SECONDS

    async def _sleep(self, seconds: float) -> None:
        """Sleeps, waking (and raising Stopped) as soon as the streamer is stopped."""
        if self._stop.is_set():
            raise Stopped
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stop.is_set():
            raise Stopped

    async def _close_call(self) -> None:
        """Closes an open stream: a quick checkpoint for a clean end (and a current cursor), else cancel."""
        call = self._call
        if call is None:
            return
        try:
            await asyncio.wait_for(self._checkpoint(), CLOSE_TIMEOUT_SECONDS)
        except (TimeoutError, SinkFailed):
            call.cancel()


class Stopped(Exception):
    """The streamer was stopped (revocation or shutdown)."""
