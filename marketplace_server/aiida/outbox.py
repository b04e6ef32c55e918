"""Durable delivery of configure and revoke calls to AIIDAs.

Approvals, revocations and terminations add `OutboxRow`s in the same
transaction as their state change; this worker sends them. It wakes at once
when rows are added (approval -> configure is on the latency path to the first
reading), when an instance's stream comes up, and on a timer for retries. Rows
of one permission go out in order, one at a time; a row that fails is retried
with exponential backoff and jitter; rows for offline instances wait for their
reconnect. Pending rows survive restarts: the worker starts from the table.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import grpc
from sqlalchemy import ARRAY, Select, String, any_, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.aiida.v1 import aiida_pb2
from eddie.energy.v1 import energy_pb2
from eddie_common.logging import log_event
from eddie_common.retry import Backoff
from eddie_common.tokens import AUDIENCE_SINK, TokenIssuer
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.background import Loop
from marketplace_server.clock import to_timestamp, utcnow
from marketplace_server.db.chunks import chunked
from marketplace_server.db.models import OutboxRow
from marketplace_server.deliveries import CONFIGURE, REVOKE, ConfigurePayload, RevokePayload
from marketplace_server.resources import permission_name

__all__ = ["OutboxWorker"]

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
MAX_IN_FLIGHT = 32
MAX_IN_FLIGHT_PER_INSTANCE = 4
BATCH = 500
RETRY_BASE = 0.5
RETRY_CAP = 60.0
OFFLINE_RECHECK = 30.0
IDLE_POLL = 5.0
SINK_TOKEN_GRACE = 3600.0  # the sink token outlives the data window by an hour (late readings, clock skew)

# (instance_id, status) -> None; applies a state the AIIDA returned from a call.
StatusSink = Callable[[str, aiida_pb2.DataAccessStatus], Awaitable[None]]
# (permission_id) -> whether the permission may still hold a data access (ACCEPTED or ACTIVE).
ActiveLookup = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True)
class Delivery:
    """One outbox row, detached from its session."""

    id: int
    permission_id: str
    instance_id: str
    kind: str
    payload: dict[str, object]
    attempts: int
    fresh: bool = False  # just committed by an approval: the permission's state need not be re-read

    @classmethod
    def of(cls, row: OutboxRow, fresh: bool = False) -> Delivery:
        return cls(
            row.id, row.permission_id, row.instance_id, row.kind, dict(row.payload), row.attempts, fresh
        )


UP_BATCH_SECONDS = 0.2  # how long stream-up events are gathered before one database read


T = TypeVar("T")

_RETRY = Backoff(RETRY_BASE, RETRY_CAP)


class OutboxWorker:
    """Sends outbox rows to AIIDAs until each is acknowledged."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        manager: ConnectionManager,
        issuer: TokenIssuer,
        may_hold_access: ActiveLookup,
        on_reported: StatusSink,
    ) -> None:
        self.sessions = sessions
        self.manager = manager
        self.issuer = issuer
        self.may_hold_access = may_hold_access
        self.on_reported = on_reported
        self.loop = Loop(self._dispatch, "outbox")
        self._in_flight: dict[str, asyncio.Task[None]] = {}  # by permission id
        self._per_instance: Counter[str] = Counter()
        self._handled_at: dict[int, float] = {}  # row id -> when this process finished or rescheduled it
        self._came_up: set[str] = set()  # instances whose streams came up, not yet made due
        self._up_flusher: asyncio.Task[None] | None = None
        # In a cluster only the replica that owns an instance delivers (and parks) its rows:
        # the instances whose streams this replica holds (None: one process, every row).
        self.local_instances: Callable[[], Collection[str]] | None = None

    def wake(self) -> None:
        self.loop.wake()

    def submit(self, rows: list[OutboxRow]) -> None:
        """Rows a transaction just committed: sent at once when possible (approval -> configure is latency
        critical), else left to the loop."""
        left = False
        for row in rows:
            delivery = Delivery.of(row, fresh=row.kind == CONFIGURE)
            if self._can_start(delivery):
                self._start(delivery)
            else:
                left = True
        if left:
            self.wake()

    def _can_start(self, delivery: Delivery) -> bool:
        return (
            not self.loop.stopping
            and len(self._in_flight) < MAX_IN_FLIGHT
            and delivery.permission_id not in self._in_flight
            and self._per_instance[delivery.instance_id] < MAX_IN_FLIGHT_PER_INSTANCE
            and self.manager.is_connected(delivery.instance_id)
        )

    async def run(self) -> None:
        """The worker (a background task until stopped)."""
        await self.loop.run()

    async def stop(self) -> None:
        """Stops taking rows; lets calls in flight finish (or cancels them after the call timeout)."""
        await self.loop.stop()
        if self._up_flusher is not None:
            self._up_flusher.cancel()
            await asyncio.gather(self._up_flusher, return_exceptions=True)
        tasks = list(self._in_flight.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=CALL_TIMEOUT + 1)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def on_instance_up(self, instance_id: str) -> None:
        """A stream came up: the instance's waiting rows are due now.

        After a restart thousands of streams come up within seconds; one UPDATE per instance
        (each a committed write transaction) made reconnecting 10,000 instances take half a
        minute. The ids are gathered for a moment and made due in a few chunked statements.
        """
        self._came_up.add(instance_id)
        if self._up_flusher is None or self._up_flusher.done():
            self._up_flusher = asyncio.create_task(self._flush_came_up(), name="outbox:came-up")

    async def _flush_came_up(self) -> None:
        while not self.loop.stopping:
            # Paced: while a reconnect storm lasts (2,000 streams a second), one read per pause
            # rather than one per loop turn.
            await asyncio.sleep(UP_BATCH_SECONDS)
            if not self._came_up:
                return
            came_up, self._came_up = self._came_up, set()
            ids: list[str] = []
            try:
                # Most instances have nothing waiting: one read of the few that do (the index on
                # `done`) instead of an UPDATE per 500 ids, and no wake-up of the loop for nothing.
                # A row committed after this read was submitted, or is due on its own.
                ids = [i for i in await self._instances_waiting() if i in came_up]
                for chunk in chunked(ids):
                    await self._make_due(*chunk)
            except Exception as exc:  # the rows stay scheduled; they are only sent later than they could be
                log_event(
                    log, "outbox_make_due_failed", logging.WARNING, instances=len(came_up), error=repr(exc)
                )
            if ids:
                self.wake()

    async def _instances_waiting(self) -> set[str]:
        """The instances that have rows not yet done."""
        async with self.sessions() as session:
            result = await session.scalars(
                select(OutboxRow.instance_id).where(OutboxRow.done.is_(False)).distinct()
            )
            return set(result)

    async def _make_due(self, *instance_ids: str) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(OutboxRow)
                .where(OutboxRow.done.is_(False), OutboxRow.instance_id.in_(instance_ids))
                .values(next_attempt_time=utcnow())
            )

    # --- the loop ---

    async def _dispatch(self) -> float:
        """Starts due rows that are first in line for their permission; returns seconds to the next due."""
        scan_started = time.monotonic()
        due, heads = await self._due_rows(utcnow())
        offline: set[str] = set()
        for delivery in due:
            if heads.get(delivery.permission_id) != delivery.id:
                continue  # an earlier row of the permission goes first
            if self._handled_at.get(delivery.id, 0.0) >= scan_started:
                continue  # handled while the scan ran: the scan's copy is stale
            if not self.manager.is_connected(delivery.instance_id):
                offline.add(delivery.instance_id)
            elif self._can_start(delivery):
                self._start(delivery)
        self._handled_at = {i: t for i, t in self._handled_at.items() if t >= scan_started}
        if offline:
            await self._wait_for_reconnect(offline)
        return await self._seconds_to_next_due()

    async def _due_rows(self, now: datetime) -> tuple[list[Delivery], dict[str, int]]:
        async with self.sessions() as session:
            rows = list(
                await session.scalars(
                    self._local(select(OutboxRow))
                    .where(OutboxRow.done.is_(False), OutboxRow.next_attempt_time <= now)
                    .order_by(OutboxRow.id)
                    .limit(BATCH)
                )
            )
            permission_ids = {r.permission_id for r in rows}
            heads: dict[str, int] = {}
            if permission_ids:
                result = await session.execute(
                    select(OutboxRow.permission_id, func.min(OutboxRow.id))
                    .where(OutboxRow.done.is_(False), OutboxRow.permission_id.in_(permission_ids))
                    .group_by(OutboxRow.permission_id)
                )
                heads = {permission_id: first for permission_id, first in result.all()}
        return [Delivery.of(r) for r in rows], heads

    async def _wait_for_reconnect(self, instance_ids: set[str]) -> None:
        """Parks the rows of offline instances until they reconnect (or a slow re-check)."""
        async with self.sessions.begin() as session:
            await session.execute(
                update(OutboxRow)
                .where(OutboxRow.done.is_(False), OutboxRow.instance_id.in_(instance_ids))
                .values(next_attempt_time=utcnow() + timedelta(seconds=OFFLINE_RECHECK))
            )
        back = [i for i in instance_ids if self.manager.is_connected(i)]
        if back:  # came up while the rows were being parked
            await self._make_due(*back)
            self.wake()

    def _local(self, statement: Select[T]) -> Select[T]:
        if self.local_instances is None:
            return statement
        ids = list(self.local_instances())
        return statement.where(OutboxRow.instance_id == any_(bindparam("local", ids, type_=ARRAY(String))))

    async def _seconds_to_next_due(self) -> float:
        async with self.sessions() as session:
            earliest = await session.scalar(
                self._local(select(func.min(OutboxRow.next_attempt_time))).where(OutboxRow.done.is_(False))
            )
        if earliest is None:
            return IDLE_POLL
        return min(IDLE_POLL, max(0.0, (earliest - utcnow()).total_seconds()))

    # --- one delivery ---

    def _start(self, delivery: Delivery) -> None:
        self._per_instance[delivery.instance_id] += 1
        task = asyncio.create_task(self._deliver(delivery), name=f"outbox:{delivery.id}")
        self._in_flight[delivery.permission_id] = task

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            note = await self._send(delivery)
            await self._finish(delivery, note)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            await self._failed(delivery, exc)
        except Exception as exc:
            await self._retry_later(delivery, repr(exc)[:200])
        finally:
            self._handled_at[delivery.id] = time.monotonic()
            self._in_flight.pop(delivery.permission_id, None)
            self._per_instance[delivery.instance_id] -= 1
            if self._per_instance[delivery.instance_id] <= 0:
                del self._per_instance[delivery.instance_id]
            if not self.loop.stopping:
                self.wake()

    async def _send(self, delivery: Delivery) -> str:
        """Calls the AIIDA; returns a note for the log ("" for a normal delivery)."""
        stub, metadata = self.manager.stub_for(delivery.instance_id)
        if delivery.kind == REVOKE:
            request = aiida_pb2.RevokeDataAccessRequest(
                permission_id=delivery.permission_id, reason=RevokePayload.from_json(delivery.payload).reason
            )
            await stub.RevokeDataAccess(request, metadata=metadata, timeout=CALL_TIMEOUT)
            return ""
        if not delivery.fresh and not await self.may_hold_access(delivery.permission_id):
            return "skipped: the permission ended before it was configured"
        access = await stub.ConfigureDataAccess(
            self._configure_request(delivery), metadata=metadata, timeout=CALL_TIMEOUT
        )
        if access.state != aiida_pb2.DataAccess.STATE_UNSPECIFIED:
            status = aiida_pb2.DataAccessStatus(
                permission_id=delivery.permission_id, state=access.state, reason=access.state_reason
            )
            await self.on_reported(delivery.instance_id, status)
        return ""

    def _configure_request(self, delivery: Delivery) -> aiida_pb2.ConfigureDataAccessRequest:
        payload = ConfigurePayload.from_json(delivery.payload)
        pid = delivery.permission_id
        ttl = max(60.0, (payload.end_time - utcnow()).total_seconds() + SINK_TOKEN_GRACE)
        token, _ = self.issuer.issue(
            permission_name(pid),
            AUDIENCE_SINK,
            ttl,
            permission_id=pid,
            eligible_party=payload.eligible_party,
            instance_id=delivery.instance_id,
            # The end of the data window: the sink refuses readings that arrive after it.
            permission_end=math.ceil(payload.end_time.timestamp()),
        )
        return aiida_pb2.ConfigureDataAccessRequest(
            data_access=aiida_pb2.DataAccess(
                permission_id=pid,
                data_need=energy_pb2.DataNeed.FromString(payload.data_need),
                sink_uri=payload.sink_uri,
                sink_token=token,
                start_time=to_timestamp(payload.start_time),
                end_time=to_timestamp(payload.end_time),
            )
        )

    async def _finish(self, delivery: Delivery, note: str) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(OutboxRow).where(OutboxRow.id == delivery.id).values(done=True, last_error=note)
            )
        log_event(
            log,
            "aiida_delivery_done",
            kind=delivery.kind,
            permission=delivery.permission_id,
            instance=delivery.instance_id,
            attempts=delivery.attempts + 1,
            note=note,
        )

    async def _failed(self, delivery: Delivery, exc: grpc.aio.AioRpcError) -> None:
        error = f"{exc.code().name}: {(exc.details() or '')[:200]}"
        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
            await self._retry_later(delivery, error)
            return
        # Permanent: the AIIDA will never accept this call; retrying cannot help.
        await self._finish(delivery, f"refused: {error}")
        if delivery.kind == CONFIGURE:
            status = aiida_pb2.DataAccessStatus(
                permission_id=delivery.permission_id,
                state=aiida_pb2.DataAccess.STATE_FAILED,
                reason=f"the AIIDA refused the configuration: {exc.details() or 'invalid argument'}",
            )
            await self.on_reported(delivery.instance_id, status)

    async def _retry_later(self, delivery: Delivery, error: str) -> None:
        delay = _RETRY.delay(delivery.attempts + 1)
        async with self.sessions.begin() as session:
            await session.execute(
                update(OutboxRow)
                .where(OutboxRow.id == delivery.id)
                .values(
                    attempts=OutboxRow.attempts + 1,
                    next_attempt_time=utcnow() + timedelta(seconds=delay),
                    last_error=error[:1000],
                )
            )
        log_event(
            log,
            "aiida_delivery_failed",
            logging.WARNING,
            kind=delivery.kind,
            permission=delivery.permission_id,
            instance=delivery.instance_id,
            attempts=delivery.attempts + 1,
            retry_in=round(delay, 2),
            error=error,
        )
