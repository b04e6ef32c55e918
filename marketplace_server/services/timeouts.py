"""Decision deadlines: PENDING permissions past their deadline become TIMED_OUT.

A background sweeper runs about once a second (sooner when a deadline is
nearer); reads also check lazily, so nobody sees a pending permission whose
deadline has passed.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select

from eddie_common.logging import log_event
from marketplace_server.background import Loop
from marketplace_server.clock import utcnow
from marketplace_server.db.models import PermissionRow
from marketplace_server.services.permissions import PENDING, TIMED_OUT, Move, PermissionLedger

__all__ = ["TIMEOUT_REASON", "DecisionTimeouts", "is_overdue"]

log = logging.getLogger(__name__)

TIMEOUT_REASON = "no decision before the deadline"
BATCH = 500
MAX_SWEEP_INTERVAL = 1.0
MIN_SWEEP_INTERVAL = 0.02


def is_overdue(row: PermissionRow) -> bool:
    return row.state == PENDING and row.decision_deadline <= utcnow()


def _time_out(row: PermissionRow) -> Move | None:
    return Move(TIMED_OUT, TIMEOUT_REASON) if is_overdue(row) else None


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

    async def fresh(self, row: PermissionRow) -> PermissionRow:
        """`row`, timed out first if it is overdue."""
        if not is_overdue(row):
            return row
        async with self.ledger.transaction() as tx:
            applied = await tx.apply(row.id, _time_out)
        return applied.row or row

    async def _seconds_to_next_deadline(self) -> float:
        async with self.sessions() as session:
            earliest = await session.scalar(
                select(func.min(PermissionRow.decision_deadline)).where(PermissionRow.state == PENDING)
            )
        if earliest is None:
            return MAX_SWEEP_INTERVAL
        seconds = (earliest - utcnow()).total_seconds()
        return min(MAX_SWEEP_INTERVAL, max(MIN_SWEEP_INTERVAL, seconds))

    async def _sweep(self) -> float:
        if await self.expire_due() >= BATCH:
            return 0.0
        return await self._seconds_to_next_deadline()

    async def run(self) -> None:
        """The sweeper (a background task until stopped)."""
        await self.loop.run()

    async def stop(self) -> None:
        await self.loop.stop()
