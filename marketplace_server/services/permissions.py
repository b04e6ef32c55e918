"""The permission state machine, in one place.

Every change of a permission's state goes through `PermissionTx.move`: it checks
the transition against `ALLOWED`, updates the row conditionally (`WHERE state =
<the state it was read in>`, so two concurrent changes cannot both win), writes a
`PermissionTransitionRow`, and records the event. Events are published, and the
outbox worker woken, only after the transaction commits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from eddie.marketplace.v1 import access_pb2, data_request_pb2
from eddie_common.errors import Aborted
from marketplace_server.clock import utcnow
from marketplace_server.db.models import OutboxRow, PermissionRow, PermissionState, PermissionTransitionRow
from marketplace_server.deliveries import CONFIGURE, REVOKE, ConfigurePayload, DeliveryKind, RevokePayload
from marketplace_server.errors import InvalidArgument, NotFound
from marketplace_server.resources import permission_name, permission_to_proto
from marketplace_server.services.events import AccessRequested, Event, EventHub, PermissionChanged
from marketplace_server.text import one_line, single_line

__all__ = [
    "ACTIVE_STATES",
    "ALLOWED",
    "TERMINAL_STATES",
    "Applied",
    "Move",
    "PermissionLedger",
    "PermissionTx",
    "State",
    "clip_reason",
    "not_found",
    "optional_reason",
    "required_reason",
]

State = access_pb2.Permission.State
PENDING = access_pb2.Permission.STATE_PENDING
ACCEPTED = access_pb2.Permission.STATE_ACCEPTED
ACTIVE = access_pb2.Permission.STATE_ACTIVE
REJECTED = access_pb2.Permission.STATE_REJECTED
TIMED_OUT = access_pb2.Permission.STATE_TIMED_OUT
UNFULFILLABLE = access_pb2.Permission.STATE_UNFULFILLABLE
REVOKED = access_pb2.Permission.STATE_REVOKED
TERMINATED = access_pb2.Permission.STATE_TERMINATED
FULFILLED = access_pb2.Permission.STATE_FULFILLED

ALLOWED: dict[PermissionState, frozenset[PermissionState]] = {
    PENDING: frozenset({ACCEPTED, REJECTED, TIMED_OUT, TERMINATED}),  # TERMINATED: withdrawn by the EP
    ACCEPTED: frozenset({ACTIVE, UNFULFILLABLE, REVOKED, TERMINATED, FULFILLED}),
    ACTIVE: frozenset({REVOKED, TERMINATED, FULFILLED, UNFULFILLABLE}),
}
TERMINAL_STATES = frozenset({REJECTED, TIMED_OUT, UNFULFILLABLE, REVOKED, TERMINATED, FULFILLED})
# States in which the AIIDA may hold (or be about to hold) a data access.
ACTIVE_STATES = frozenset({ACCEPTED, ACTIVE})
MAX_REASON = 500
MAX_ATTEMPTS = 5


def clip_reason(reason: str) -> str:
    """A reason from elsewhere (an AIIDA) as stored: one line, at most MAX_REASON characters."""
    return one_line(reason, MAX_REASON)


def optional_reason(reason: str, field: str = "reason") -> str:
    """A caller's reason: at most MAX_REASON characters, printable; surrounding spaces dropped."""
    text = reason.strip()
    if len(text) > MAX_REASON or not single_line(text):
        raise InvalidArgument.for_field(field, f"at most {MAX_REASON} characters on one line")
    return text


def required_reason(reason: str, field: str = "reason") -> str:
    """A caller's required reason: 1 to MAX_REASON printable characters."""
    text = optional_reason(reason, field)
    if not text:
        raise InvalidArgument.for_field(field, f"required: 1 to {MAX_REASON} characters")
    return text


@dataclass(frozen=True)
class Move:
    """A planned transition: the target state, its reason, and other columns to set."""

    to_state: PermissionState
    reason: str = ""
    changes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Applied:
    """What `PermissionTx.apply` did: the row (None if unknown), the state it left (None: unchanged)."""

    row: PermissionRow | None
    previous_state: PermissionState | None

    @property
    def moved(self) -> bool:
        return self.previous_state is not None


class InvalidTransition(Exception):
    """A programming error: a transition the state machine does not allow."""


class PermissionTx:
    """One transaction's permission changes; see `PermissionLedger.transaction`."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.events: list[Event] = []
        self.deliveries: list[OutboxRow] = []

    async def get(self, permission_id: str) -> PermissionRow | None:
        return await self.session.get(PermissionRow, permission_id, populate_existing=True)

    async def move(self, row: PermissionRow, move: Move) -> bool:
        """Applies `move` to `row` if its state is still the one read; False if it changed meanwhile."""
        from_state = row.state
        if move.to_state not in ALLOWED.get(from_state, frozenset()):
            raise InvalidTransition(f"{State.Name(from_state)} -> {State.Name(move.to_state)}")
        if move.to_state in TERMINAL_STATES and not move.reason:
            raise InvalidTransition("a terminal state needs a reason")
        now = utcnow()
        values = {"state": move.to_state, "state_reason": move.reason, "update_time": now, **move.changes}
        result = await self.session.execute(
            update(PermissionRow)
            .where(PermissionRow.id == row.id, PermissionRow.state == from_state)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        for key, value in values.items():
            set_committed_value(row, key, value)
        self.session.add(
            PermissionTransitionRow(
                permission_id=row.id,
                from_state=from_state,
                to_state=move.to_state,
                reason=move.reason,
                time=now,
            )
        )
        self.events.append(changed(row, from_state))
        return True

    async def apply(
        self,
        permission_id: str,
        plan: Callable[[PermissionRow], Move | None],
        first: PermissionRow | None = None,
    ) -> Applied:
        """Reads the permission and applies `plan(row)` (None: leave it), re-reading if it changed meanwhile.

        `first` is the row as just read in this transaction, if the caller has it. `plan` may raise a
        domain error (the transaction then rolls back).
        """
        for attempt in range(MAX_ATTEMPTS):
            row = first if attempt == 0 and first is not None else await self.get(permission_id)
            if row is None:
                return Applied(None, None)
            before = row.state
            move = plan(row)
            if move is None:
                return Applied(row, None)
            if await self.move(row, move):
                return Applied(row, before)
        raise Aborted("the permission changed concurrently; retry", reason="CONCURRENT_CHANGE")

    def created(self, row: PermissionRow, data_request: data_request_pb2.DataRequest) -> None:
        """Records the events of a new pending permission (the row must already be added)."""
        permission = permission_to_proto(row)
        self.events.append(AccessRequested(permission, data_request, row.customer_id))
        self.events.append(changed(row, access_pb2.Permission.STATE_UNSPECIFIED, permission))

    async def configure(self, row: PermissionRow, payload: ConfigurePayload) -> None:
        """Queues the configure call to the permission's AIIDA (sent after commit by the outbox worker)."""
        await self._deliver(row, CONFIGURE, payload.to_json())

    async def revoke(self, row: PermissionRow, reason: str) -> None:
        """Queues the revoke call; a configure not yet delivered is dropped (the AIIDA never starts)."""
        await self.session.execute(
            update(OutboxRow)
            .where(OutboxRow.permission_id == row.id, OutboxRow.kind == CONFIGURE, OutboxRow.done.is_(False))
            .values(done=True, last_error="superseded by a revoke")
            .execution_options(synchronize_session=False)
        )
        await self._deliver(row, REVOKE, RevokePayload(reason).to_json())

    async def _deliver(self, row: PermissionRow, kind: DeliveryKind, payload: dict[str, object]) -> None:
        now = utcnow()
        delivery = OutboxRow(
            permission_id=row.id,
            instance_id=row.instance_id,
            kind=kind,
            payload=payload,
            attempts=0,
            next_attempt_time=now,
            last_error="",
            done=False,
            create_time=now,
        )
        self.session.add(delivery)
        await self.session.flush()  # assigns its id
        self.deliveries.append(delivery)


def changed(
    row: PermissionRow, previous_state: PermissionState, permission: access_pb2.Permission | None = None
) -> PermissionChanged:
    return PermissionChanged(
        permission=permission or permission_to_proto(row),
        previous_state=previous_state,
        customer_id=row.customer_id,
        eligible_party_id=row.eligible_party_id,
        data_request_id=row.data_request_id,
    )


class PermissionLedger:
    """Opens permission transactions; publishes their events after commit."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], hub: EventHub) -> None:
        self.sessions = sessions
        self.hub = hub
        # Called after commit with the outbox rows the transaction added.
        self.outbox_listeners: list[Callable[[list[OutboxRow]], None]] = []

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PermissionTx]:
        async with self.sessions.begin() as session:
            tx = PermissionTx(session)
            yield tx
        self.hub.publish(tx.events)
        if tx.deliveries:
            for listener in self.outbox_listeners:
                listener(tx.deliveries)

    async def state_of(self, permission_id: str) -> int | None:
        async with self.sessions() as session:
            state = await session.scalar(select(PermissionRow.state).where(PermissionRow.id == permission_id))
        return None if state is None else int(state)

    async def may_hold_access(self, permission_id: str) -> bool:
        """Whether the permission's AIIDA may hold (or be about to hold) its data access."""
        return await self.state_of(permission_id) in ACTIVE_STATES

    async def load_visible(self, permission_id: str, account_id: str) -> PermissionRow:
        """The permission if `account_id` is its customer or eligible party, else NOT_FOUND."""
        async with self.sessions() as session:
            row = await session.get(PermissionRow, permission_id)
        if row is None or account_id not in (row.customer_id, row.eligible_party_id):
            raise not_found(permission_id)
        return row


def not_found(permission_id: str) -> NotFound:
    return NotFound(f"{permission_name(permission_id)} not found", reason="PERMISSION_NOT_FOUND")
