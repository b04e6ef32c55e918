"""What AIIDAs report about their data accesses, applied to the permissions.

Statuses arrive on each instance's Connect stream (and after every reconnect
the AIIDA re-reports all of them), so applying one is idempotent: a status that
would be an invalid transition is ignored. An instance may only change the
permissions configured on it; anything else is logged and dropped. Statuses of
one permission are applied in arrival order (one worker per hash partition).
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections import Counter

from sqlalchemy import select

from eddie.aiida.v1 import aiida_pb2
from eddie_common.logging import log_event
from marketplace_server.db.models import OutboxRow, PermissionRow
from marketplace_server.services.permissions import (
    ACCEPTED,
    ACTIVE,
    ACTIVE_STATES,
    FULFILLED,
    REVOKE,
    REVOKED,
    TERMINAL_STATES,
    TERMINATED,
    UNFULFILLABLE,
    Move,
    PermissionLedger,
    PermissionTx,
    clip_reason,
)

__all__ = ["StatusApplier"]

log = logging.getLogger(__name__)

AccessState = aiida_pb2.DataAccess
Queued = tuple[str, aiida_pb2.DataAccessStatus]
WORKERS = 4
QUEUE_SIZE = 10_000
# Statuses of one instance waiting to be applied. Past it that instance's statuses are dropped, so
# one instance flooding (it re-reports on every reconnect anyway) cannot hold up, or with full queues
# drop, the reports of every other instance behind its own in a shared queue.
MAX_QUEUED_PER_INSTANCE = 256
_PERMISSION_ID = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
FULFILLED_REASON = "the data window ended"
UNFULFILLABLE_REASON = "the AIIDA cannot serve the data need"
ENDED_REASON = "the permission has ended"
TERMINATED_REASON = "terminated by the eligible party at the AIIDA"


def planned_move(state: int, status: aiida_pb2.DataAccessStatus) -> Move | None:
    """The transition a reported status asks for, or None when it changes nothing valid."""
    reported = status.state
    reason = clip_reason(status.reason)
    if reported == AccessState.STATE_ACTIVE:
        return Move(ACTIVE) if state == ACCEPTED else None
    if state not in ACTIVE_STATES:
        return None
    if reported in (AccessState.STATE_UNFULFILLABLE, AccessState.STATE_FAILED):
        return Move(UNFULFILLABLE, reason or UNFULFILLABLE_REASON)
    if reported == AccessState.STATE_FULFILLED:
        return Move(FULFILLED, FULFILLED_REASON)
    if reported == AccessState.STATE_TERMINATED:  # e.g. the EP's MQTT TERMINATE command
        return Move(TERMINATED, reason or TERMINATED_REASON)
    if reported == AccessState.STATE_REVOKED:
        return Move(REVOKED, f"revoked at the AIIDA: {reason}" if reason else "revoked at the AIIDA")
    return None


class StatusApplier:
    """Turns DataAccessStatus reports into permission transitions."""

    def __init__(self, ledger: PermissionLedger, workers: int = WORKERS) -> None:
        self.ledger = ledger
        self._stopping = False
        self._queues: list[asyncio.Queue[Queued | None]] = [asyncio.Queue(QUEUE_SIZE) for _ in range(workers)]
        self._queued: Counter[str] = Counter()  # by instance id
        self._over_quota: set[str] = set()

    async def on_stream_status(self, instance_id: str, status: aiida_pb2.DataAccessStatus) -> None:
        """The manager's status listener: queues without awaiting, so arrival order is kept."""
        if self._stopping:
            return
        queued = self._queued[instance_id]
        if queued >= MAX_QUEUED_PER_INSTANCE:
            if instance_id not in self._over_quota:  # logged once per episode, not per status
                self._over_quota.add(instance_id)
                log_event(
                    log, "aiida_status_dropped", logging.WARNING, instance=instance_id, why="over_quota"
                )
            return
        queue = self._queues[zlib.crc32(status.permission_id.encode()) % len(self._queues)]
        try:
            queue.put_nowait((instance_id, status))
            self._queued[instance_id] = queued + 1
        except asyncio.QueueFull:
            log_event(log, "aiida_status_dropped", logging.WARNING, instance=instance_id, why="queue_full")

    async def run(self) -> None:
        """The workers (a background task until stopped)."""
        await asyncio.gather(*(self._work(queue) for queue in self._queues))

    async def stop(self) -> None:
        """Applies what is being applied, drops the rest, and ends the workers."""
        self._stopping = True
        for queue in self._queues:
            while not queue.empty():
                queue.get_nowait()
                queue.task_done()
            queue.put_nowait(None)

    async def _work(self, queue: asyncio.Queue[Queued | None]) -> None:
        while (item := await queue.get()) is not None:
            try:
                await self.apply(*item, from_stream=True)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("aiida_status_failed")
            finally:
                self._dequeued(item[0])
                queue.task_done()
        queue.task_done()

    def _dequeued(self, instance_id: str) -> None:
        left = self._queued[instance_id] - 1
        if left > 0:
            self._queued[instance_id] = left
        else:
            del self._queued[instance_id]
            self._over_quota.discard(instance_id)

    async def join(self) -> None:
        """Waits until every status queued so far has been applied."""
        for queue in self._queues:
            await queue.join()

    async def apply(
        self, instance_id: str, status: aiida_pb2.DataAccessStatus, *, from_stream: bool = False
    ) -> None:
        """Applies one status reported by `instance_id` (on its stream, or as the answer to a call)."""
        permission_id = status.permission_id
        if not _PERMISSION_ID.fullmatch(permission_id):
            log_event(
                log, "aiida_status_ignored", logging.WARNING, instance=instance_id, why="bad_permission_id"
            )
            return
        foreign = False

        def plan(row: PermissionRow) -> Move | None:
            nonlocal foreign
            foreign = row.instance_id != instance_id
            return None if foreign else planned_move(row.state, status)

        async with self.ledger.transaction() as tx:
            applied = await tx.apply(permission_id, plan)
            row = applied.row
            if row is None or foreign:
                why = "unknown_permission" if row is None else "permission_of_another_instance"
                level = logging.INFO if row is None else logging.WARNING
                log_event(
                    log,
                    "aiida_status_ignored",
                    level,
                    instance=instance_id,
                    permission=permission_id,
                    why=why,
                )
                return
            if from_stream and status.state == AccessState.STATE_ACTIVE and row.state in TERMINAL_STATES:
                await self._revoke_again(tx, row)
        if applied.moved:
            log_event(
                log,
                "permission_reported",
                permission=permission_id,
                instance=instance_id,
                state=AccessState.State.Name(status.state),
            )

    async def _revoke_again(self, tx: PermissionTx, row: PermissionRow) -> None:
        """The AIIDA still runs an access that has ended here (e.g. it lost a revoke): revoke it again."""
        pending = await tx.session.scalar(
            select(OutboxRow.id)
            .where(OutboxRow.permission_id == row.id, OutboxRow.kind == REVOKE, OutboxRow.done.is_(False))
            .limit(1)
        )
        if pending is None:
            await tx.revoke(row, row.state_reason or ENDED_REASON)
            log_event(log, "permission_revoked_again", permission=row.id, instance=row.instance_id)
