"""Workflow 6, customer side: the consent channel, decisions and revocations."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2
from eddie_common.logging import log_event
from marketplace_server.aiida.outbox import configure_payload
from marketplace_server.auth import require_customer
from marketplace_server.clock import utcnow
from marketplace_server.db.models import AccountRow, DataRequestRow, PermissionRow
from marketplace_server.errors import DomainError, FailedPrecondition
from marketplace_server.rpc.converters import data_request_to_proto, permission_to_proto
from marketplace_server.services.access import not_active
from marketplace_server.services.events import AccessRequested, EventHub, Item, PermissionChanged, Subscriber
from marketplace_server.services.permissions import (
    ACCEPTED,
    ACTIVE_STATES,
    PENDING,
    REJECTED,
    REVOKED,
    TIMED_OUT,
    Move,
    PermissionLedger,
    not_found,
    optional_reason,
    parse_permission_name,
    required_reason,
)
from marketplace_server.services.receipts import APPROVE, REJECT, REVOKE, ReceiptSigner, write_receipt
from marketplace_server.services.timeouts import TIMEOUT_REASON, DecisionTimeouts

__all__ = ["ConsentService"]

log = logging.getLogger(__name__)

ConnectResponse = consent_pb2.ConnectResponse
REJECT_REASON = "rejected by the customer"


def _deadline_passed(permission_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the decision deadline of permissions/{permission_id} has passed", reason="DECISION_DEADLINE_PASSED"
    )


_Push = Callable[[Item], bool]


class _ConsentStream:
    """What one consent stream has sent, so an event and a decision's answer go out once."""

    MAX_REMEMBERED = 10_000

    def __init__(self, pending: set[str]) -> None:
        self.requested = pending  # sent in the opening snapshot
        self.last_update: dict[str, tuple[int, int]] = {}

    def response_for(self, item: Item) -> consent_pb2.ConnectResponse | None:
        if isinstance(item, AccessRequested):
            if item.permission.name in self.requested:  # created while the stream opened: already sent
                self.requested.discard(item.permission.name)
                return None
            return ConnectResponse(
                access_request=consent_pb2.AccessRequest(
                    permission=item.permission, data_request=item.data_request
                )
            )
        if isinstance(item, PermissionChanged):
            return self._update(item.permission)
        if isinstance(item, consent_pb2.ConnectResponse):
            return self._update(item.permission_update) if item.HasField("permission_update") else item
        return None

    def _update(self, permission: access_pb2.Permission) -> consent_pb2.ConnectResponse | None:
        key = (permission.update_time.ToNanoseconds(), permission.state)
        if self.last_update.get(permission.name) == key:
            return None
        if len(self.last_update) >= self.MAX_REMEMBERED:
            self.last_update.clear()
        self.last_update[permission.name] = key
        return ConnectResponse(permission_update=permission)


def _decision(
    now: datetime, approve: bool, reason: str, window: timedelta
) -> Callable[[PermissionRow], Move]:
    """The transition a decision makes: approval opens the data window now."""

    def plan(row: PermissionRow) -> Move:
        if row.state == TIMED_OUT:
            raise _deadline_passed(row.id)
        if row.state != PENDING:
            raise FailedPrecondition(
                f"permissions/{row.id} has already been decided", reason="PERMISSION_ALREADY_DECIDED"
            )
        if row.decision_deadline <= now:
            return Move(TIMED_OUT, TIMEOUT_REASON)
        if approve:
            return Move(ACCEPTED, reason, {"decide_time": now, "start_time": now, "end_time": now + window})
        return Move(REJECTED, reason or REJECT_REASON, {"decide_time": now})

    return plan


class ConsentService:
    """ConsentService.Connect, DecideAccess and RevokePermission (customers only)."""

    def __init__(
        self, ledger: PermissionLedger, hub: EventHub, timeouts: DecisionTimeouts, signer: ReceiptSigner
    ) -> None:
        self.ledger = ledger
        self.sessions = ledger.sessions
        self.hub = hub
        self.timeouts = timeouts
        self.signer = signer

    # --- DecideAccess ---

    async def decide_access(self, request: consent_pb2.DecideAccessRequest) -> access_pb2.Permission:
        caller = require_customer().account_id
        return await self.decide(caller, request.permission, request.approve, request.reason)

    async def decide(self, customer_id: str, name: str, approve: bool, reason: str) -> access_pb2.Permission:
        permission_id = parse_permission_name(name, "permission")
        reason = optional_reason(reason)
        now = utcnow()
        async with self.ledger.transaction() as tx:
            found = (
                await tx.session.execute(
                    select(PermissionRow, DataRequestRow.data_need)
                    .join(DataRequestRow, DataRequestRow.id == PermissionRow.data_request_id)
                    .where(PermissionRow.id == permission_id)
                    .execution_options(populate_existing=True)
                )
            ).first()
            if found is None or found[0].customer_id != customer_id:
                raise not_found(permission_id)
            row, data_need = found
            window = energy_pb2.DataNeed.FromString(data_need).duration.ToTimedelta()
            applied = await tx.apply(permission_id, _decision(now, approve, reason, window), first=row)
            decided = applied.row
            assert decided is not None
            if decided.state == ACCEPTED:
                await tx.configure(decided, configure_payload(decided, data_need))
            if applied.moved and decided.state in (ACCEPTED, REJECTED):
                decision = APPROVE if decided.state == ACCEPTED else REJECT
                await write_receipt(tx.session, self.signer, decided, decision, decided.state_reason, now)
        if decided.state == TIMED_OUT:
            raise _deadline_passed(permission_id)
        log_event(log, "access_decided", permission=permission_id, customer=customer_id, approved=approve)
        return permission_to_proto(decided)

    # --- RevokePermission ---

    async def revoke(self, request: consent_pb2.RevokePermissionRequest) -> access_pb2.Permission:
        caller = require_customer().account_id
        permission_id = parse_permission_name(request.name)
        reason = required_reason(request.reason)

        def plan(row: PermissionRow) -> Move | None:
            if row.customer_id != caller:
                raise not_found(permission_id)
            if row.state not in ACTIVE_STATES:
                raise not_active(row)
            return Move(REVOKED, reason)

        async with self.ledger.transaction() as tx:
            applied = await tx.apply(permission_id, plan)
            if applied.row is None:
                raise not_found(permission_id)
            await tx.revoke(applied.row, reason)
            await write_receipt(tx.session, self.signer, applied.row, REVOKE, reason)
        log_event(log, "permission_revoked", permission=permission_id, customer=caller)
        return permission_to_proto(applied.row)

    # --- Connect ---

    async def connect(
        self, requests: AsyncIterator[consent_pb2.ConnectRequest]
    ) -> AsyncIterator[consent_pb2.ConnectResponse]:
        caller = require_customer().account_id
        with self.hub.subscribe(caller) as subscriber:
            pending = await self._pending_access_requests(caller)
            stream = _ConsentStream({r.permission.name for r in pending})
            for access_request in pending:
                yield ConnectResponse(access_request=access_request)
            yield ConnectResponse(ready=consent_pb2.ConsentStreamReady(pending_count=len(pending)))
            reader = asyncio.create_task(self._read_decisions(caller, requests, subscriber.push))
            reader.add_done_callback(functools.partial(_end_on_reader_failure, subscriber))
            try:
                while True:
                    response = stream.response_for(await subscriber.next())
                    if response is not None:
                        yield response
            finally:
                reader.cancel()

    async def _read_decisions(
        self, customer_id: str, requests: AsyncIterator[consent_pb2.ConnectRequest], answer: _Push
    ) -> None:
        """Decides what the client sends; each answer goes out on the stream's own queue."""
        async for request in requests:
            if not request.HasField("decision"):
                continue
            decision = request.decision
            try:
                permission = await self.decide(
                    customer_id, decision.permission, decision.approve, decision.reason
                )
                answer(ConnectResponse(permission_update=permission))
            except DomainError as exc:
                answer(_decision_error(decision.permission, exc))
            except Exception:
                log.exception("consent_decision_failed")
                answer(_decision_error(decision.permission, DomainError("internal error", reason="INTERNAL")))

    async def _pending_access_requests(self, customer_id: str) -> list[consent_pb2.AccessRequest]:
        await self.timeouts.expire_due(PermissionRow.customer_id == customer_id)
        async with self.sessions() as session:
            rows = list(
                await session.scalars(
                    select(PermissionRow)
                    .where(PermissionRow.customer_id == customer_id, PermissionRow.state == PENDING)
                    .order_by(PermissionRow.seq)
                )
            )
            data_requests = await _data_requests(session, {r.data_request_id for r in rows})
        return [
            consent_pb2.AccessRequest(
                permission=permission_to_proto(r), data_request=data_requests[r.data_request_id]
            )
            for r in rows
        ]


def _decision_error(permission: str, error: DomainError) -> consent_pb2.ConnectResponse:
    """What the unary DecideAccess would have returned, as a message on the stream."""
    return ConnectResponse(
        decision_error=consent_pb2.DecisionError(
            permission=permission, code=error.code.value[0], reason=error.reason, message=error.message
        )
    )


def _end_on_reader_failure(subscriber: Subscriber, task: asyncio.Task[None]) -> None:
    """A request stream that cannot be read (malformed message, transport error) ends the stream with
    that error, so the client learns its decisions are no longer heard instead of waiting forever.
    A client that merely half-closes keeps receiving access requests and updates."""
    if task.cancelled() or (error := task.exception()) is None:
        return
    log_event(log, "consent_stream_read_failed", logging.DEBUG, error=type(error).__name__)
    subscriber.fail(error)


async def _data_requests(session: AsyncSession, ids: set[str]) -> dict[str, data_request_pb2.DataRequest]:
    """The data requests (with their owners' names) of `ids`, by id."""
    if not ids:
        return {}
    result = await session.execute(
        select(DataRequestRow, AccountRow.display_name)
        .join(AccountRow, AccountRow.id == DataRequestRow.owner_id)
        .where(DataRequestRow.id.in_(ids))
    )
    return {row.id: data_request_to_proto(row, owner_name) for row, owner_name in result.all()}
