"""What the authorization matrix's allowed calls must return, and snapshots of refused calls' targets."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import func, select

from eddie.marketplace.v1 import access_pb2, data_request_pb2, instance_pb2
from marketplace_server.db.models import InstanceRow, SearchRow
from tests.support.authorization import (
    CUSTOMER_A,
    CUSTOMER_B,
    EP_A,
    Code,
    Ctx,
    DataRequest,
    Permission,
    Tenant,
    is_decision_error,
)

# --- what allowed calls must return ---


def _one(responses: list[Any]) -> Any:
    assert len(responses) == 1, f"{len(responses)} responses"
    return responses[0]


def is_caller(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    assert _one(responses).name == ctx.account(caller), "not the caller's own account"


def account_of(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        assert _one(responses).account.name == ctx.tenant(label).customer_name, "a token of another account"

    return check


def has_keys(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    assert _one(responses).signing_keys, "no signing keys"


def new_account(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    account = _one(responses)
    assert account.name.startswith("accounts/") and account.name != ctx.account(caller)


def registered_unclaimed(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    instance = _one(responses).instance
    assert instance.state == instance_pb2.Instance.STATE_REGISTERED and not instance.owner


def registered_owned_by(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        t = ctx.tenant(label)
        instance = _one(responses).instance
        assert instance.name == t.instance and instance.owner == t.customer_name, f"owner is {instance.owner}"

    return check


def instance_of(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        instance = _one(responses)
        assert instance.name == ctx.tenant(label).instance and instance.owner == ctx.account(caller)

    return check


def own_instances(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    listed = {i.instance_id for i in _one(responses).instances}
    expected = {CUSTOMER_A: {ctx.a.instance_id}, CUSTOMER_B: {ctx.b.instance_id}}.get(caller, set())
    # An eligible party owns no instances: an empty list, not an error (the list is "the caller's").
    assert listed == expected, f"listed {sorted(listed)}, expected {sorted(expected)}"


def created_by_caller(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    created = _one(responses)
    assert created.owner == ctx.account(caller), f"owned by {created.owner}"
    assert created.name not in (ctx.a.dr_replayed, ctx.b.dr_replayed), "replayed another's request_id"


def replayed(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        assert _one(responses).name == ctx.tenant(label).dr_replayed, "not the earlier data request"

    return check


def is_data_request(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        t = ctx.tenant(label)
        found = _one(responses)
        assert found.name == t.data_request and found.owner == t.ep_name

    return check


def lists_both_tenants(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    names = {d.name for d in _one(responses).data_requests}
    assert {ctx.a.data_request, ctx.b.data_request} <= names, "browsing hides a tenant's data request"


def lists_owned_by(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        t = ctx.tenant(label)
        listed = _one(responses).data_requests
        assert t.data_request in {d.name for d in listed}
        assert all(d.owner == t.ep_name for d in listed), "the owner filter let others through"

    return check


def closed(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    assert _one(responses).state == DataRequest.STATE_CLOSED


def searched(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        assert responses and responses[-1].HasField("summary"), "the search sent no summary"
        prefix = f"{ctx.tenant(label).data_request}/searches/"
        assert responses[-1].summary.search.startswith(prefix), responses[-1].summary.search

    return check


def is_search(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        assert _one(responses).name == ctx.tenant(label).search

    return check


def requested(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        t = ctx.tenant(label)
        permissions = _one(responses).permissions
        assert len(permissions) == 1
        p = permissions[0]
        # The instance already has a live permission for this data request: that one comes back
        # (API.md, RequestAccess), not a second one.
        assert p.name == t.pending, "not the instance's live permission"
        assert (p.eligible_party, p.customer, p.data_request) == (t.ep_name, t.customer_name, t.data_request)
        assert p.state == Permission.STATE_PENDING

    return check


def replayed_access(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        names = tuple(p.name for p in _one(responses).permissions)
        assert names == ctx.tenant(label).access_replayed, "not the earlier permissions"

    return check


def is_permission(name_of: Callable[[Ctx], str]) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        permission = _one(responses)
        assert permission.name == name_of(ctx)
        assert ctx.account(caller) in (permission.customer, permission.eligible_party)

    return check


def _only_callers(ctx: Ctx, caller: str, permissions: Iterable[Permission]) -> list[Permission]:
    permissions = list(permissions)
    me = ctx.account(caller)
    strangers = [p.name for p in permissions if me not in (p.customer, p.eligible_party)]
    assert not strangers, f"another tenant's permissions: {strangers}"
    return permissions


def own_permissions(data_request_of: str = "") -> Callable[[Ctx, str, list[Any]], None]:
    """Only the caller's permissions; all of them (of the data request of tenant `data_request_of`)."""

    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        listed = _only_callers(ctx, caller, _one(responses).permissions)
        names = {p.name for p in listed}
        mine = ctx.a if caller in (CUSTOMER_A, EP_A) else ctx.b
        if data_request_of and ctx.tenant(data_request_of) is not mine:
            assert not names, "permissions of another tenant's data request"
            return
        # Each target permission but `pending` has a data request of its own (see `new_pending`).
        expected = {mine.pending} if data_request_of else {mine.pending, mine.accepted}
        assert expected <= names, "the caller's own permissions are missing"
        if data_request_of:
            assert all(p.data_request == mine.data_request for p in listed)

    return check


def page_continues(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    _only_callers(ctx, caller, _one(responses).permissions)


def watched(data_request_of: str = "") -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        assert responses, "no first message"
        permissions = _only_callers(ctx, caller, [e.permission for e in responses])
        mine = ctx.a if caller == EP_A else ctx.b
        expected = {mine.pending} if data_request_of else {mine.pending, mine.accepted}
        assert expected <= {p.name for p in permissions}, "the snapshot is incomplete"
        if data_request_of:
            assert all(p.data_request == mine.data_request for p in permissions)

    return check


def in_state(state: int) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        got = _one(responses).state
        assert got == state, f"state {Permission.State.Name(got)}"  # type: ignore[arg-type]

    return check


def consent_channel(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    assert responses, "no first message"
    assert responses[-1].HasField("ready"), "no ready message"
    permissions = [r.access_request.permission for r in responses if r.HasField("access_request")]
    permissions += [r.permission_update for r in responses if r.HasField("permission_update")]
    listed = _only_callers(ctx, caller, permissions)
    mine = ctx.a if caller == CUSTOMER_A else ctx.b
    assert mine.pending in {p.name for p in listed}, "a pending access request is missing"


def decided_on_stream(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        target = ctx.tenant(label).connect_me
        updates = [r.permission_update for r in responses if r.HasField("permission_update")]
        assert any(u.name == target and u.state == Permission.STATE_REJECTED for u in updates), "no update"

    return check


def refused_on_stream(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    """Someone else's permission on the consent stream: the in-band answer is NOT_FOUND."""

    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        target = ctx.tenant(label).connect_me
        errors = [r.decision_error for r in responses if is_decision_error(r)]
        assert [(e.permission, e.code, e.reason) for e in errors] == [
            (target, Code.NOT_FOUND.value[0], "PERMISSION_NOT_FOUND")
        ], f"decision errors {errors}"
        updates = [r.permission_update.name for r in responses if r.HasField("permission_update")]
        assert target not in updates, "an update of another tenant's permission"
        _only_callers(ctx, caller, permissions_in(responses))

    return check


def feed_of(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    """The audit feed of tenant `label`'s instance: its searches and its permissions' steps, nothing else."""

    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        t = ctx.tenant(label)
        activities = list(_one(responses).activities)
        assert {a.instance_id for a in activities} == {t.instance_id}, "another instance's activity"
        assert t.search in {a.search for a in activities}, "the tenant's search is missing"
        steps = {a.permission for a in activities if a.permission}
        assert t.accepted in steps, "the accepted permission's steps are missing"
        other = ctx.b if t is ctx.a else ctx.a
        theirs = {other.pending, other.accepted, other.decide_me, other.revoke_me, other.terminate_me}
        assert not steps & theirs, "another tenant's permission"

    return check


def _claims(jws: str) -> dict[str, Any]:
    body = jws.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def own_receipts(ctx: Ctx, caller: str, responses: list[Any]) -> None:
    receipts = list(_one(responses).consent_receipts)
    assert {_claims(r.jws)["customer"] for r in receipts} == {ctx.account(caller)}, "another's receipts"
    mine = ctx.a if caller == CUSTOMER_A else ctx.b
    assert mine.accepted in {r.permission for r in receipts}, "the approval's receipt is missing"


def receipt_of(label: str) -> Callable[[Ctx, str, list[Any]], None]:
    def check(ctx: Ctx, caller: str, responses: list[Any]) -> None:
        receipt = _one(responses)
        claims = _claims(receipt.jws)
        assert receipt.permission == claims["permission"] == ctx.tenant(label).accepted
        assert (claims["decision"], claims["customer"]) == ("approve", ctx.tenant(label).customer_name)

    return check


# --- snapshots of targets ---


async def read_permission(t: Tenant, name: str) -> Permission:
    request = access_pb2.GetPermissionRequest(name=name)
    permission: Permission = await t.ep.access.GetPermission(request, metadata=t.ep.metadata)
    return permission


async def read_data_request(t: Tenant, name: str) -> DataRequest:
    request = data_request_pb2.GetDataRequestRequest(name=name)
    found: DataRequest = await t.ep.data_requests.GetDataRequest(request, metadata=t.ep.metadata)
    return found


async def read_permissions_of(t: Tenant) -> list[str]:
    listed = await t.ep.access.ListPermissions(
        access_pb2.ListPermissionsRequest(data_request=t.data_request, page_size=500), metadata=t.ep.metadata
    )
    return sorted(p.name for p in listed.permissions)


async def read_instance_row(ctx: Ctx, instance_id: str) -> tuple[Any, ...]:
    async with ctx.world.market.app.sessions() as session:
        row = await session.get(InstanceRow, instance_id)
    assert row is not None
    return (row.owner_id, row.address, row.secret_hash, row.pairing_code_hash, row.claim_time)


async def read_search_count(ctx: Ctx, t: Tenant) -> int:
    data_request_id = t.data_request.removeprefix("dataRequests/")
    async with ctx.world.market.app.sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(SearchRow).where(SearchRow.data_request_id == data_request_id)
        )
    return int(count or 0)


def permissions_in(messages: list[Any]) -> list[Permission]:
    found: list[Permission] = []
    for m in messages:
        if isinstance(m, access_pb2.PermissionEvent):
            found.append(m.permission)
        elif m.HasField("access_request"):
            found.append(m.access_request.permission)
        elif m.HasField("permission_update"):
            found.append(m.permission_update)
    return found
