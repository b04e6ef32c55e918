"""Workflow 6, eligible party side: requesting access, reading and ending permissions."""

from __future__ import annotations

import logging
import re
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from eddie.marketplace.v1 import access_pb2
from eddie_common.logging import log_event
from eddie_common.page_tokens import PageTokenCodec, page_size
from marketplace_server import idempotency
from marketplace_server.auth import principal, require_eligible_party
from marketplace_server.clock import utcnow
from marketplace_server.db.chunks import chunked
from marketplace_server.db.counters import reserve
from marketplace_server.db.match_sets import matched_by_data_request
from marketplace_server.db.models import (
    LIVE_PERMISSION_STATES,
    InstanceRow,
    PermissionRow,
    PermissionTransitionRow,
)
from marketplace_server.errors import FailedPrecondition, InvalidArgument, Validator
from marketplace_server.resources import (
    data_request_to_proto,
    ensure_owned_open,
    is_instance_id,
    load_data_request,
    parse_data_request_name,
    parse_permission_name,
    permission_name,
    permission_to_proto,
)
from marketplace_server.security import new_id
from marketplace_server.services.instances import valid_address
from marketplace_server.services.permissions import (
    ACTIVE_STATES,
    PENDING,
    TERMINAL_STATES,
    TERMINATED,
    Move,
    PermissionLedger,
    PermissionTx,
    not_found,
    required_reason,
)
from marketplace_server.services.timeouts import DecisionTimeouts, is_due, is_overdue, settle

__all__ = ["AccessService"]

log = logging.getLogger(__name__)

METHOD_REQUEST = "RequestAccess"
METHOD_LIST = "ListPermissions"
SEQ_COUNTER = "permissions"
MAX_INSTANCES = 1000
LIVE_STATES = LIVE_PERMISSION_STATES
# A RequestAccess that loses a race retries; each loss means another call committed, so this bounds
# the retries only against a pathological storm (many concurrent calls for the same instances).
MAX_CREATE_ATTEMPTS = 20
MAX_SINK_URI = 300
_SINK_URI = re.compile(r"(?:grpc|mqtt)s?://(.+)", re.ASCII)  # DataSinkService or an MQTT broker


def validate_request_access(request: access_pb2.RequestAccessRequest) -> str:
    """Checks every field; returns the data request id."""
    v = Validator()
    data_request_id = ""
    try:
        data_request_id = parse_data_request_name(request.data_request, "data_request")
    except InvalidArgument as exc:
        v.violations.extend(exc.violations)
    ids = list(request.instance_ids)
    v.check(1 <= len(ids) <= MAX_INSTANCES, "instance_ids", f"1 to {MAX_INSTANCES:,} instance ids")
    seen: set[str] = set()
    for i, instance_id in enumerate(ids[:MAX_INSTANCES]):
        if not is_instance_id(instance_id):
            v.add(f"instance_ids[{i}]", "not a valid instance id")
        elif instance_id in seen:
            v.add(f"instance_ids[{i}]", "duplicate instance id")
        seen.add(instance_id)
    match = _SINK_URI.fullmatch(request.sink_uri)
    v.check(
        match is not None and len(request.sink_uri) <= MAX_SINK_URI and valid_address(match.group(1)),
        "sink_uri",
        "must be grpc://, grpcs://, mqtt:// or mqtts:// host:port",
    )
    idempotency.check_request_id(v, request.request_id)
    v.raise_if_any()
    return data_request_id


async def _owners_of_matched(session: AsyncSession, data_request_id: str, ids: list[str]) -> dict[str, str]:
    """The owner of each instance; FAILED_PRECONDITION unless all were matched and are still claimed."""
    matched = await matched_by_data_request(session, data_request_id, ids)
    owners: dict[str, str | None] = {}
    for chunk in chunked(ids):
        result = await session.execute(
            select(InstanceRow.instance_id, InstanceRow.owner_id).where(InstanceRow.instance_id.in_(chunk))
        )
        owners.update({instance_id: owner for instance_id, owner in result.all()})
    unmatched = [i for i in ids if i not in matched]
    if unmatched:
        raise FailedPrecondition(
            f"instance {unmatched[0]} was not matched by a search of this data request",
            reason="INSTANCE_NOT_MATCHED",
            metadata={"instance_id": unmatched[0], "unmatched_count": str(len(unmatched))},
        )
    unclaimed = [i for i in ids if owners.get(i) is None]
    if unclaimed:
        raise FailedPrecondition(
            f"instance {unclaimed[0]} is no longer claimed by a customer",
            reason="INSTANCE_NOT_CLAIMED",
            metadata={"instance_id": unclaimed[0]},
        )
    return {i: str(owners[i]) for i in ids}


async def _live_permissions(
    tx: PermissionTx, data_request_id: str, ids: list[str]
) -> dict[str, PermissionRow]:
    """The live (PENDING, ACCEPTED or ACTIVE) permission of each instance for the data request, by instance.

    API.md: such an instance gets that permission back, not a second one. A pending permission past its
    decision deadline, or an approved one past its end time, is not live: it is timed out or fulfilled
    here, in the same transaction.
    """
    live: dict[str, PermissionRow] = {}
    for chunk in chunked(ids):
        rows = await tx.session.scalars(
            select(PermissionRow).where(
                PermissionRow.data_request_id == data_request_id,
                PermissionRow.instance_id.in_(chunk),
                PermissionRow.state.in_(LIVE_STATES),
            )
        )
        for row in rows:
            if is_due(row):
                await settle(tx, row.id, first=row)
            elif row.instance_id not in live or row.seq > live[row.instance_id].seq:
                live[row.instance_id] = row
    return live


class AccessService:
    """RequestAccess, GetPermission, ListPermissions and TerminatePermission."""

    def __init__(
        self,
        ledger: PermissionLedger,
        timeouts: DecisionTimeouts,
        pages: PageTokenCodec,
        decision_timeout: float,
    ) -> None:
        self.ledger = ledger
        self.sessions = ledger.sessions
        self.timeouts = timeouts
        self.pages = pages
        self.decision_timeout = decision_timeout

    # --- RequestAccess ---

    async def request_access(
        self, request: access_pb2.RequestAccessRequest
    ) -> access_pb2.RequestAccessResponse:
        caller = require_eligible_party().account_id
        data_request_id = validate_request_access(request)
        request_id = request.request_id
        fingerprint = ""
        if request_id:
            canonical = access_pb2.RequestAccessRequest()
            canonical.CopyFrom(request)
            canonical.request_id = ""
            fingerprint = idempotency.fingerprint(canonical)

        async def replay(earlier: str) -> list[PermissionRow]:
            async with self.sessions() as session:
                return await self._load_in_order(session, earlier.split())

        rows = await idempotency.create_once(
            self.sessions,
            caller,
            METHOD_REQUEST,
            request_id,
            fingerprint,
            lambda: self._create_or_join(caller, data_request_id, request, fingerprint),
            replay,
        )
        return access_pb2.RequestAccessResponse(permissions=[permission_to_proto(r) for r in rows])

    async def _create_or_join(
        self, caller: str, data_request_id: str, request: access_pb2.RequestAccessRequest, fingerprint: str
    ) -> list[PermissionRow]:
        """`_create`, retried after losing a race to a concurrent call (this replica's or another's).

        The unique index on live permissions (`ux_permissions_live`) lets only one of two concurrent
        inserts for the same (data request, instance) commit; the other fails with IntegrityError and
        its whole transaction rolls back. The retry reads the winner's permission as live and returns it,
        creating only those of the batch's instances that still have none. A lost race for the request
        id (`idempotency.remember`) ends the same way: the retry finds the winner's stored result.
        """
        for attempt in range(1, MAX_CREATE_ATTEMPTS + 1):
            try:
                return await self._create(caller, data_request_id, request, fingerprint)
            except IntegrityError:
                if attempt == MAX_CREATE_ATTEMPTS:
                    raise
                log_event(
                    log, "access_request_raced", logging.DEBUG, data_request=data_request_id, attempt=attempt
                )
        raise AssertionError("unreachable")

    async def _create(
        self, caller: str, data_request_id: str, request: access_pb2.RequestAccessRequest, fingerprint: str
    ) -> list[PermissionRow]:
        ids = list(request.instance_ids)
        async with self.ledger.transaction() as tx:
            session = tx.session
            if request.request_id:
                earlier = await idempotency.find(
                    session, caller, METHOD_REQUEST, request.request_id, fingerprint
                )
                if earlier is not None:
                    return await self._load_in_order(session, earlier.split())
            data_request, owner_name = await load_data_request(session, data_request_id)
            ensure_owned_open(data_request, caller, "request access")
            owners = await _owners_of_matched(session, data_request_id, ids)
            live = await _live_permissions(tx, data_request_id, ids)
            fresh = [(new_id(), i) for i in ids if i not in live]
            created = {i: pid for pid, i in fresh}
            permission_ids = [live[i].id if i in live else created[i] for i in ids]
            if request.request_id:
                await idempotency.remember(
                    session, caller, METHOD_REQUEST, request.request_id, fingerprint, " ".join(permission_ids)
                )
            new_rows = await self._insert(tx, caller, data_request_id, request.sink_uri, fresh, owners)
            data_request_proto = data_request_to_proto(data_request, owner_name)
            for row in new_rows:
                tx.created(row, data_request_proto)
        by_instance = {**live, **{r.instance_id: r for r in new_rows}}
        log_event(
            log,
            "access_requested",
            data_request=data_request_id,
            eligible_party=caller,
            permissions=len(new_rows),
            already_live=len(live),
        )
        return [by_instance[i] for i in ids]

    async def _insert(
        self,
        tx: PermissionTx,
        caller: str,
        data_request_id: str,
        sink_uri: str,
        pairs: list[tuple[str, str]],
        owners: dict[str, str],
    ) -> list[PermissionRow]:
        if not pairs:
            return []
        now = utcnow()
        deadline = now + timedelta(seconds=self.decision_timeout)
        first_seq = await reserve(tx.session, SEQ_COUNTER, len(pairs))
        rows = []
        for offset, (permission_id, instance_id) in enumerate(pairs):
            rows.append(
                PermissionRow(
                    id=permission_id,
                    seq=first_seq + offset,
                    data_request_id=data_request_id,
                    instance_id=instance_id,
                    eligible_party_id=caller,
                    customer_id=owners[instance_id],
                    state=PENDING,
                    state_reason="",
                    sink_uri=sink_uri,
                    create_time=now,
                    decision_deadline=deadline,
                    decide_time=None,
                    start_time=None,
                    end_time=None,
                    update_time=now,
                )
            )
        tx.session.add_all(rows)
        await tx.session.flush()
        tx.session.add_all(
            [
                PermissionTransitionRow(
                    permission_id=r.id, from_state=0, to_state=PENDING, reason="requested", time=now
                )
                for r in rows
            ]
        )
        return rows

    async def _load_in_order(self, session: AsyncSession, permission_ids: list[str]) -> list[PermissionRow]:
        found: dict[str, PermissionRow] = {}
        for chunk in chunked(permission_ids):
            found.update(
                {
                    r.id: r
                    for r in await session.scalars(select(PermissionRow).where(PermissionRow.id.in_(chunk)))
                }
            )
        return [found[i] for i in permission_ids if i in found]

    # --- reading ---

    async def get(self, name: str) -> access_pb2.Permission:
        caller = principal()
        row = await self.ledger.load_visible(parse_permission_name(name), caller.account_id)
        return permission_to_proto(await self.timeouts.fresh(row))

    async def list(self, request: access_pb2.ListPermissionsRequest) -> access_pb2.ListPermissionsResponse:
        caller = principal()
        size = page_size(request.page_size)
        data_request_id = (
            parse_data_request_name(request.data_request, "data_request") if request.data_request else ""
        )
        if request.state not in access_pb2.Permission.State.values():
            raise InvalidArgument.for_field("state", "unknown state")
        scope = PermissionRow.customer_id if caller.is_customer else PermissionRow.eligible_party_id
        bound = {"account": caller.account_id, "data_request": data_request_id, "state": request.state}
        after = self.pages.decode_int(request.page_token, METHOD_LIST, bound, "seq")
        await self.timeouts.expire_due(scope == caller.account_id)
        query = select(PermissionRow).where(scope == caller.account_id)
        if data_request_id:
            query = query.where(PermissionRow.data_request_id == data_request_id)
        if request.state:
            query = query.where(PermissionRow.state == request.state)
        if after is not None:
            query = query.where(PermissionRow.seq < after)
        async with self.sessions() as session:
            if data_request_id:  # an unknown data request is NOT_FOUND, as in every other RPC naming one
                await load_data_request(session, data_request_id)
            rows = list(await session.scalars(query.order_by(PermissionRow.seq.desc()).limit(size + 1)))
        rows, token = self.pages.page(rows, size, METHOD_LIST, bound, lambda r: {"seq": r.seq})
        return access_pb2.ListPermissionsResponse(
            permissions=[permission_to_proto(r) for r in rows], next_page_token=token
        )

    # --- TerminatePermission ---

    async def terminate(self, request: access_pb2.TerminatePermissionRequest) -> access_pb2.Permission:
        caller = require_eligible_party().account_id
        permission_id = parse_permission_name(request.name)
        reason = required_reason(request.reason)

        def plan(row: PermissionRow) -> Move | None:
            if row.eligible_party_id != caller:
                raise not_found(row.id)
            if is_overdue(row) or row.state in TERMINAL_STATES:
                raise not_active(row)
            return Move(TERMINATED, reason)

        await self.timeouts.fresh(await self.ledger.load_visible(permission_id, caller))
        async with self.ledger.transaction() as tx:
            applied = await tx.apply(permission_id, plan)
            if applied.row is None:
                raise not_found(permission_id)
            if applied.previous_state in ACTIVE_STATES:
                await tx.revoke(applied.row, reason)
        log_event(log, "permission_terminated", permission=permission_id, eligible_party=caller)
        return permission_to_proto(applied.row)


def not_active(row: PermissionRow) -> FailedPrecondition:
    return FailedPrecondition(
        f"{permission_name(row.id)} has already ended",
        reason="PERMISSION_NOT_ACTIVE",
        metadata={"state": access_pb2.Permission.State.Name(row.state)},
    )
