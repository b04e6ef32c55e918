"""Deadlines: PENDING permissions past their decision deadline become TIMED_OUT, and ACCEPTED or
ACTIVE permissions past their end time become FULFILLED (the AIIDA is told through the outbox, even
if it is silent and never reports the end itself).

A background sweeper runs about once a second (sooner when a deadline is
nearer); reads also check lazily, so nobody sees a pending permission whose
deadline has passed, or a live one whose data window is over.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select

from eddie_common.logging import log_event
from marketplace_server.background import Loop
from marketplace_server.clock import utcnow
from marketplace_server.db.models import PermissionRow
from marketplace_server.services.permissions import (
    ACTIVE_STATES,
    FULFILLED,
    PENDING,
    TIMED_OUT,
    Applied,
    Move,
    PermissionLedger,
    PermissionTx,
)

__all__ = ["FULFILLED_REASON", "TIMEOUT_REASON", "DecisionTimeouts", "is_due", "is_overdue", "settle"]

log = logging.getLogger(__name__)

TIMEOUT_REASON = "no decision before the deadline"
FULFILLED_REASON = "the data window ended"
BATCH = 500
MAX_SWEEP_INTERVAL = 1.0
MIN_SWEEP_INTERVAL = 0.02


def is_overdue(row: PermissionRow) -> bool:
    return row.state == PENDING and row.decision_deadline <= utcnow()


def is_past_end(row: PermissionRow) -> bool:
    return row.state in ACTIVE_STATES and row.end_time is not None and row.end_time <= utcnow()


def is_due(row: PermissionRow) -> bool:
    """Whether the row is past a deadline the sweeper acts on."""
    return is_overdue(row) or is_past_end(row)


def _time_out(row: PermissionRow) -> Move | None:
    return Move(TIMED_OUT, TIMEOUT_REASON) if is_overdue(row) else None


def _settle(row: PermissionRow) -> Move | None:
    if is_overdue(row):
        return Move(TIMED_OUT, TIMEOUT_REASON)
    return Move(FULFILLED, FULFILLED_REASON) if is_past_end(row) else None


async def settle(tx: PermissionTx, permission_id: str, first: PermissionRow | None = None) -> Applied:
    """Times out or fulfils the permission if it is past a deadline; a fulfilment tells its AIIDA."""
    applied = await tx.apply(permission_id, _settle, first)
    if applied.row is not None and applied.previous_state in ACTIVE_STATES:
        await tx.revoke(applied.row, FULFILLED_REASON)
    return applied


class DecisionTimeouts:
    """Times out overdue pending permissions, in the background and on read."""

    def __init__(self, ledger: PermissionLedger) -> None:
        self.ledger = ledger
        self.sessions = ledger.sessions
        self.loop = Loop(self._sweep, "decision_timeouts")

    async def expire(self, permission_ids: list[str]) -> None:
        """Times out those of `permission_ids` that are still pending and overdue."""
        for start in range(0, len(permission_ids), BATCH):
            async with self.ledger.transaction() as tx:
                for permission_id in permission_ids[start : start + BATCH]:
                    await tx.apply(permission_id, _time_out)

    async def expire_due(self, *conditions: Any) -> int:
        """Times out overdue pending permissions (matching `conditions`); returns how many were due."""
        query = (
            select(PermissionRow.id)
            .where(PermissionRow.state == PENDING, PermissionRow.decision_deadline <= utcnow(), *conditions)
            .order_by(PermissionRow.decision_deadline)
            .limit(BATCH)
        )
        async with self.sessions() as session:
            ids = list(await session.scalars(query))
        if ids:
            await self.expire(ids)
            log_event(log, "permissions_timed_out", count=len(ids))
        return len(ids)

    async def fulfil(self, permission_ids: list[str]) -> None:
        """Fulfils those of `permission_ids` whose data window is over, and tells their AIIDAs."""
        for start in range(0, len(permission_ids), BATCH):
            async with self.ledger.transaction() as tx:
                for permission_id in permission_ids[start : start + BATCH]:
                    await settle(tx, permission_id)

    async def fulfil_due(self) -> int:
        """Fulfils live permissions past their end time; returns how many were due."""
        query = (
            select(PermissionRow.id)
            .where(PermissionRow.state.in_(ACTIVE_STATES), PermissionRow.end_time <= utcnow())
            .order_by(PermissionRow.end_time)
            .limit(BATCH)
        )
        async with self.sessions() as session:
            ids = list(await session.scalars(query))
        if ids:
            await self.fulfil(ids)
            log_event(log, "permissions_fulfilled", count=len(ids))
        return len(ids)

    async def fresh(self, row: PermissionRow) -> PermissionRow:
        """`row`, timed out or fulfilled first if it is past its deadline."""
        if not is_due(row):
            return row
        if is_past_end(row):
            await self.fulfil([row.id])
            async with self.sessions() as session:
                return await session.get(PermissionRow, row.id) or row
        async with self.ledger.transaction() as tx:
            applied = await tx.apply(row.id, _time_out)
        return applied.row or row

    async def _seconds_to_next_deadline(self) -> float:
        async with self.sessions() as session:
            deadline = await session.scalar(
                select(func.min(PermissionRow.decision_deadline)).where(PermissionRow.state == PENDING)
            )
            end = await session.scalar(
                select(func.min(PermissionRow.end_time)).where(PermissionRow.state.in_(ACTIVE_STATES))
            )
        due = [t for t in (deadline, end) if t is not None]
        if not due:
            return MAX_SWEEP_INTERVAL
        seconds = float((min(due) - utcnow()).total_seconds())
        return min(MAX_SWEEP_INTERVAL, max(MIN_SWEEP_INTERVAL, seconds))

    async def _sweep(self) -> float:
        if await self.expire_due() >= BATCH or await self.fulfil_due() >= BATCH:
            return 0.0
        return await self._seconds_to_next_deadline()

    async def run(self) -> None:
        """The sweeper (a background task until stopped)."""
        await self.loop.run()

    async def stop(self) -> None:
        await self.loop.stop()
