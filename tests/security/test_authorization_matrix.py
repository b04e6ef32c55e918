"""Authorization matrix (OWASP API1:2023, broken object-level authorization).

Every RPC of the marketplace's public services is enumerated from the generated
descriptors (an RPC without rows in MATRIX fails its own test) and called as
nobody, customer A, customer B, eligible party A and eligible party B, against
objects of both tenants. Each call must end with the exact status and
`google.rpc.ErrorInfo` reason that the contract (API.md) and the services define:

- no token: UNAUTHENTICATED / TOKEN_MISSING, except for the public methods
  (CreateAccount, CreateToken, RefreshToken, ListSigningKeys, RegisterInstance),
  which work for anyone;
- wrong role: PERMISSION_DENIED / ROLE_NOT_ALLOWED. The role check runs before
  any lookup, so it says nothing about the object;
- another tenant's private object (an instance, a stored search, a permission):
  NOT_FOUND. A "ghost" call, which names an object that does not exist, must get
  exactly the same answer: same code, reason and message once the ids are blanked;
- data requests are public to every signed-in user (API.md: GetDataRequest and
  ListDataRequests are for "anyone signed in", and browsing is the point of the
  marketplace), so their existence is no secret. The owner-only operations on
  someone else's data request (CloseDataRequest, SearchInstances, RequestAccess,
  WatchPermissions filtered to it) are PERMISSION_DENIED / NOT_OWNER, as the
  services and their own tests define;
- a refused mutation changes nothing: its target is read before the refused
  calls and again after them, before any allowed caller runs.

Streaming RPCs are judged by the status their stream ends with. When the call
is allowed, they are judged by their first messages instead, which must all be
the caller's. A separate test checks that live streams never carry another
tenant's events, and another covers the EP sink's ListReadings with real
marketplace-issued tokens.

One world, on one event loop, serves the whole module (tests.security.world
plus the objects of a second tenant and the targets that mutating rows consume).
Run with `-s` for a table of rpc x target x caller -> outcome.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from sqlalchemy import func, select

from eddie.framework.v1 import data_sink_pb2
from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, identity_pb2, instance_pb2
from eddie_common.interceptors import error_info
from marketplace_server.db.models import InstanceRow, SearchRow
from tests.conftest import Client
from tests.eddie_sink.conftest import RunningSink, bearer, reading, sink_config, start_sink
from tests.security.calls import RPCS
from tests.security.world import (
    PASSWORD,
    SECRET,
    SINK_URI,
    World,
    _register_and_claim,
    build_world,
    data_need,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ANON, CUSTOMER_A, CUSTOMER_B, EP_A, EP_B = "anonymous", "customer_A", "customer_B", "ep_A", "ep_B"
CALLERS = (ANON, CUSTOMER_A, CUSTOMER_B, EP_A, EP_B)
CALL_TIMEOUT = 10.0
FIRST_MESSAGE = 5.0  # an allowed stream's first message must arrive within this
STREAM_IDLE = 0.5  # an open-ended stream quiet for this long has sent its snapshot
GHOST_PERMISSION = "permissions/nosuchpermission0"
GHOST_INSTANCE = "instances/no-such-instance"
Code = grpc.StatusCode
Permission = access_pb2.Permission
DataRequest = data_request_pb2.DataRequest


# --- the tenants and their objects ---


@dataclass
class Tenant:
    """One tenant: a customer owning an instance, and an EP with a data request on it."""

    customer: Client
    ep: Client
    instance_id: str
    data_request: str = ""  # searched, with permissions on the instance
    search: str = ""  # the stored search of data_request
    pending: str = ""  # permissions (ep -> customer) that rows only read
    accepted: str = ""
    close_me: str = ""  # targets that one mutating row consumes
    decide_me: str = ""
    revoke_me: str = ""
    terminate_me: str = ""
    connect_me: str = ""
    dr_request_id: str = ""  # a CreateDataRequest request_id the ep already used ...
    dr_replayed: str = ""  # ... and the data request it created
    access_request_id: str = ""  # a RequestAccess request_id the ep already used ...
    access_replayed: tuple[str, ...] = ()  # ... and the permissions it created
    permissions_page_token: str = ""  # the ep's ListPermissions page token

    @property
    def pairing_code(self) -> str:
        return f"CODE-{self.instance_id}"

    @property
    def instance(self) -> str:
        return f"instances/{self.instance_id}"

    @property
    def customer_name(self) -> str:
        return _account(self.customer)

    @property
    def ep_name(self) -> str:
        return _account(self.ep)


@dataclass
class Ctx:
    world: World
    a: Tenant
    b: Tenant
    refresh_tokens: list[str]  # fresh refresh tokens of customer A, one per RefreshToken call
    counter: itertools.count[int] = field(default_factory=itertools.count)
    stand_ins: dict[str, Client] = field(default_factory=dict)  # caller -> who plays them (one row)

    def tenant(self, label: str) -> Tenant:
        return self.a if label == "A" else self.b

    def client(self, caller: str) -> Client:
        if caller in self.stand_ins:
            return self.stand_ins[caller]
        clients = {
            ANON: self.world.market.client(),
            CUSTOMER_A: self.a.customer,
            CUSTOMER_B: self.b.customer,
            EP_A: self.a.ep,
            EP_B: self.b.ep,
        }
        return clients[caller]

    def account(self, caller: str) -> str:
        return "" if caller == ANON else _account(self.client(caller))

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{next(self.counter)}-{uuid.uuid4().hex[:8]}"


def _account(client: Client) -> str:
    assert client.account is not None
    return client.account.name


def aio(client: Client, service: str) -> Any:
    """The client's grpc.aio stub of `service` (the generated stubs are typed as synchronous)."""
    return getattr(client, service)


def _data_request_body(title: str = "Heat pump study") -> DataRequest:
    return DataRequest(title=title, purpose="Grid planning research", data_need=data_need())


async def _create_data_request(ep: Client, request_id: str = "") -> str:
    created = await aio(ep, "data_requests").CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(data_request=_data_request_body(), request_id=request_id),
        metadata=ep.metadata,
    )
    return str(created.name)


async def _search(ep: Client, data_request: str) -> str:
    search = ""
    async for response in aio(ep, "data_requests").SearchInstances(
        data_request_pb2.SearchInstancesRequest(data_request=data_request, timeout=Duration(seconds=1)),
        metadata=ep.metadata,
    ):
        if response.HasField("summary"):
            search = response.summary.search
    assert search, "the search stored nothing"
    return search


def _access_request(t: Tenant, request_id: str = "") -> access_pb2.RequestAccessRequest:
    return access_pb2.RequestAccessRequest(
        data_request=t.data_request, instance_ids=[t.instance_id], sink_uri=SINK_URI, request_id=request_id
    )


async def _request_access(t: Tenant, request_id: str = "") -> list[str]:
    response = await aio(t.ep, "access").RequestAccess(_access_request(t, request_id), metadata=t.ep.metadata)
    return [p.name for p in response.permissions]


async def _pending(t: Tenant, fresh: bool = True) -> str:
    """A new pending permission on the tenant's instance. One data request gives an instance one live
    permission (API.md, RequestAccess), so each but the first is asked under a data request of its own."""
    if not fresh:
        return (await _request_access(t))[0]
    data_request = await _create_data_request(t.ep)
    await _search(t.ep, data_request)
    response = await aio(t.ep, "access").RequestAccess(
        access_pb2.RequestAccessRequest(
            data_request=data_request, instance_ids=[t.instance_id], sink_uri=SINK_URI
        ),
        metadata=t.ep.metadata,
    )
    return str(response.permissions[0].name)


async def _accepted(t: Tenant) -> str:
    name = await _pending(t)
    await aio(t.customer, "consent").DecideAccess(
        consent_pb2.DecideAccessRequest(permission=name, approve=True), metadata=t.customer.metadata
    )
    return name


async def _build_tenant(customer: Client, ep: Client, instance_id: str) -> Tenant:
    t = Tenant(customer, ep, instance_id)
    t.data_request = await _create_data_request(ep)
    t.search = await _search(ep, t.data_request)
    t.pending = await _pending(t, fresh=False)
    t.accepted = await _accepted(t)
    t.close_me = await _create_data_request(ep)
    t.decide_me = await _pending(t)
    t.revoke_me = await _accepted(t)
    t.terminate_me = await _accepted(t)
    t.connect_me = await _pending(t)
    t.dr_request_id = str(uuid.uuid4())
    t.dr_replayed = await _create_data_request(ep, t.dr_request_id)
    t.access_request_id = str(uuid.uuid4())
    t.access_replayed = tuple(await _request_access(t, t.access_request_id))
    listed = await aio(ep, "access").ListPermissions(
        access_pb2.ListPermissionsRequest(page_size=1), metadata=ep.metadata
    )
    t.permissions_page_token = listed.next_page_token
    assert t.permissions_page_token
    return t


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ctx(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Ctx]:
    world = await build_world(tmp_path_factory.mktemp("authz"))
    try:
        # Tenant A is the world's customer and EP (its customer owns fuzz-claimed-1); tenant B is
        # the world's "other" customer and EP, with an instance of their own on the same AIIDA double.
        await _register_and_claim(world, "authz-b-1", world.other_customer)
        a = await _build_tenant(world.customer, world.ep, "fuzz-claimed-1")
        b = await _build_tenant(world.other_customer, world.other_ep, "authz-b-1")
        email = a.customer.account.email  # type: ignore[union-attr]
        refresh_tokens = []
        for _ in CALLERS:
            token = await aio(world.market.client(), "identity").CreateToken(
                identity_pb2.CreateTokenRequest(email=email, password=PASSWORD)
            )
            refresh_tokens.append(token.refresh_token)
        yield Ctx(world, a, b, refresh_tokens)
    finally:
        await world.close()


# --- calling, judging, and comparing with a ghost ---


@dataclass(frozen=True)
class Ok:
    """The call succeeds; `check(ctx, caller, responses)` asserts what it returned.

    `inband_refusal`: the call succeeds, but what it asks for is refused inside it (a decision on
    the consent stream answered with a decision_error); it is run and judged like a refusal.
    """

    check: Callable[[Ctx, str, list[Any]], None] | None = None
    inband_refusal: bool = False


@dataclass(frozen=True)
class Err:
    code: grpc.StatusCode
    reason: str

    def __str__(self) -> str:
        return f"{self.code.name}/{self.reason}"


Expect = Ok | Err
Build = Callable[[Ctx, str], Message | list[Message]]
UNAUTH = Err(Code.UNAUTHENTICATED, "TOKEN_MISSING")
ROLE = Err(Code.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
NOT_OWNER = Err(Code.PERMISSION_DENIED, "NOT_OWNER")
OK = Ok()


def nf(reason: str) -> Err:
    return Err(Code.NOT_FOUND, reason)


@dataclass(frozen=True)
class Row:
    """One target of one RPC, and what each caller gets."""

    target: str
    build: Build  # the request(s) a caller sends
    expect: Mapping[str, Expect]
    # Read before the refused calls and after them; a refusal must leave it equal.
    snapshot: Callable[[Ctx], Awaitable[object]] | None = None
    # The same request naming an object that does not exist: every caller the row refuses must
    # get exactly the same answer for it as for the real target.
    ghost: Build | None = None
    # Each signed-in caller is played by a fresh account of the same role (for calls that would
    # consume the caller itself, such as DeleteAccount).
    stand_ins: bool = False


@dataclass
class Outcome:
    responses: list[Any]
    error: grpc.aio.AioRpcError | None

    @property
    def label(self) -> str:
        if self.error is None:
            errors = [r.decision_error for r in self.responses if _is_decision_error(r)]
            inband = "".join(f" +decision_error {_code_name(e.code)}/{e.reason}" for e in errors)
            return f"OK({len(self.responses)}){inband}"
        info = error_info(self.error)
        return f"{self.error.code().name}/{info.reason if info else '-'}"


def _code_name(value: int) -> str:
    return next((c.name for c in Code if c.value[0] == value), str(value))


def _is_decision_error(response: Any) -> bool:
    return isinstance(response, consent_pb2.ConnectResponse) and response.HasField("decision_error")


async def _read_stream(call: Any, responses: list[Any]) -> None:
    """Reads the first message (waiting FIRST_MESSAGE), then until the end or STREAM_IDLE of quiet."""
    wait = FIRST_MESSAGE
    while True:
        try:
            message = await asyncio.wait_for(call.read(), wait)
        except TimeoutError:
            call.cancel()
            return
        if message is grpc.aio.EOF:
            return
        responses.append(message)
        wait = STREAM_IDLE


async def _converse(call: Any, requests: list[Any], responses: list[Any]) -> None:
    """ConsentService.Connect: reads up to `ready`, sends the decisions, reads until each is answered."""
    async with asyncio.timeout(FIRST_MESSAGE):
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            responses.append(message)
            if message.HasField("ready"):
                break
    unanswered = {r.decision.permission for r in requests if r.HasField("decision")}
    for request in requests:
        await call.write(request)
    async with asyncio.timeout(FIRST_MESSAGE):
        while unanswered:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            responses.append(message)
            if message.HasField("decision_error"):
                unanswered.discard(message.decision_error.permission)
            elif message.HasField("permission_update"):
                unanswered.discard(message.permission_update.name)


async def invoke(ctx: Ctx, method: MethodDescriptor, attr: str, caller: str, built: Any) -> Outcome:
    requests: list[Message] = built if isinstance(built, list) else [built]
    client = ctx.client(caller)
    stub = getattr(getattr(client, attr), method.name)
    metadata = client.metadata
    responses: list[Any] = []
    call: Any = None
    try:
        if not method.client_streaming and not method.server_streaming:
            responses.append(await stub(requests[0], metadata=metadata, timeout=CALL_TIMEOUT))
        elif method.client_streaming and not method.server_streaming:
            responses.append(await stub(iter(requests), metadata=metadata, timeout=CALL_TIMEOUT))
        elif not method.client_streaming:
            call = stub(requests[0], metadata=metadata, timeout=CALL_TIMEOUT)
            await _read_stream(call, responses)
        else:
            call = stub(metadata=metadata, timeout=CALL_TIMEOUT)
            await _converse(call, requests, responses)
    except grpc.aio.AioRpcError as exc:
        return Outcome(responses, exc)
    except TimeoutError:
        pass  # a stream that stopped short of what was expected: judged by what it sent
    finally:
        if call is not None:
            call.cancel()
    return Outcome(responses, None)


_IDS = re.compile(r"(permissions/|instances/|dataRequests/|searches/|instance |permission )['\w.-]+")


def _blank(text: str) -> str:
    return _IDS.sub(r"\1<id>", text)


def signature(outcome: Outcome) -> tuple[Any, ...]:
    """What a caller can tell about an outcome, with resource ids blanked."""
    if outcome.error is not None:
        info = error_info(outcome.error)
        return (outcome.error.code(), info.reason if info else None, _blank(outcome.error.details() or ""))
    errors = [r.decision_error for r in outcome.responses if _is_decision_error(r)]
    return ("OK", tuple((e.code, e.reason, _blank(e.message)) for e in errors))


def judge(ctx: Ctx, caller: str, expect: Expect, outcome: Outcome, domain: str = "marketplace.eddie") -> str:
    """'' if `outcome` is what `expect` says, else what is wrong."""
    error = outcome.error
    if isinstance(expect, Err):
        if error is None:
            return f"expected {expect}, got {outcome.label}"
        info = error_info(error)
        if error.code() != expect.code or info is None or info.reason != expect.reason:
            return f"expected {expect}, got {outcome.label}: {error.details()}"
        if info.domain != domain:
            return f"ErrorInfo domain {info.domain!r}, expected {domain!r}"
        return ""
    if error is not None:
        return f"expected OK, got {outcome.label}: {error.details()}"
    if expect.check is not None:
        try:
            expect.check(ctx, caller, outcome.responses)
        except AssertionError as exc:
            return f"OK, but {exc}"
    return ""


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
        # Each target permission but `pending` has a data request of its own (see `_pending`).
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
        errors = [r.decision_error for r in responses if _is_decision_error(r)]
        assert [(e.permission, e.code, e.reason) for e in errors] == [
            (target, Code.NOT_FOUND.value[0], "PERMISSION_NOT_FOUND")
        ], f"decision errors {errors}"
        updates = [r.permission_update.name for r in responses if r.HasField("permission_update")]
        assert target not in updates, "an update of another tenant's permission"
        _only_callers(ctx, caller, _permissions_in(responses))

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


async def _permission(t: Tenant, name: str) -> Permission:
    request = access_pb2.GetPermissionRequest(name=name)
    permission: Permission = await aio(t.ep, "access").GetPermission(request, metadata=t.ep.metadata)
    return permission


async def _data_request(t: Tenant, name: str) -> DataRequest:
    request = data_request_pb2.GetDataRequestRequest(name=name)
    found: DataRequest = await aio(t.ep, "data_requests").GetDataRequest(request, metadata=t.ep.metadata)
    return found


async def _permissions_of(t: Tenant) -> list[str]:
    listed = await aio(t.ep, "access").ListPermissions(
        access_pb2.ListPermissionsRequest(data_request=t.data_request, page_size=500), metadata=t.ep.metadata
    )
    return sorted(p.name for p in listed.permissions)


async def _instance_row(ctx: Ctx, instance_id: str) -> tuple[Any, ...]:
    async with ctx.world.market.app.sessions() as session:
        row = await session.get(InstanceRow, instance_id)
    assert row is not None
    return (row.owner_id, row.address, row.secret_hash, row.pairing_code_hash, row.claim_time)


async def _search_count(ctx: Ctx, t: Tenant) -> int:
    data_request_id = t.data_request.removeprefix("dataRequests/")
    async with ctx.world.market.app.sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(SearchRow).where(SearchRow.data_request_id == data_request_id)
        )
    return int(count or 0)


# --- the matrix ---


def everyone(expect: Expect) -> dict[str, Expect]:
    return dict.fromkeys(CALLERS, expect)


def signed_in(expect: Expect) -> dict[str, Expect]:
    return {**dict.fromkeys(CALLERS, expect), ANON: UNAUTH}


def by_tenant(
    own: str, *, customer: Expect, ep: Expect, other_customer: Expect, other_ep: Expect
) -> dict[str, Expect]:
    """Expectations for the objects of tenant `own` ("A" or "B"), by the caller's relation to them."""
    other = "B" if own == "A" else "A"
    return {
        ANON: UNAUTH,
        f"customer_{own}": customer,
        f"ep_{own}": ep,
        f"customer_{other}": other_customer,
        f"ep_{other}": other_ep,
    }


def both(make: Callable[[str], list[Row]]) -> list[Row]:
    """Rows for tenant A's objects and the mirrored rows for tenant B's."""
    return make("A") + make("B")


def identity_rows() -> dict[str, list[Row]]:
    return {
        "IdentityService.CreateAccount": [
            Row(
                "a new account (public)",
                lambda ctx, caller: identity_pb2.CreateAccountRequest(
                    email=f"{ctx.unique('authz')}@example.org",
                    password=PASSWORD,
                    display_name="Matrix",
                    role=identity_pb2.ROLE_CUSTOMER,
                ),
                everyone(Ok(new_account)),
            ),
            # Sign-up necessarily tells that an e-mail is taken; it tells nothing else about the account.
            Row(
                "customer A's e-mail",
                lambda ctx, caller: identity_pb2.CreateAccountRequest(
                    email=ctx.a.customer.account.email,  # type: ignore[union-attr]
                    password=PASSWORD,
                    display_name="Impostor",
                    role=identity_pb2.ROLE_CUSTOMER,
                ),
                everyone(Err(Code.ALREADY_EXISTS, "EMAIL_TAKEN")),
            ),
        ],
        "IdentityService.CreateToken": [
            Row(
                "customer A's credentials (public)",
                lambda ctx, caller: identity_pb2.CreateTokenRequest(
                    email=ctx.a.customer.account.email,  # type: ignore[union-attr]
                    password=PASSWORD,
                ),
                everyone(Ok(account_of("A"))),
            ),
            Row(
                "customer A's e-mail, a wrong password",
                lambda ctx, caller: identity_pb2.CreateTokenRequest(
                    email=ctx.a.customer.account.email,  # type: ignore[union-attr]
                    password=PASSWORD + "!",
                ),
                everyone(Err(Code.UNAUTHENTICATED, "INVALID_CREDENTIALS")),
            ),
        ],
        "IdentityService.RefreshToken": [
            # The token is a bearer credential: whoever presents it gets A's session, not their own.
            Row(
                "customer A's refresh token (public)",
                lambda ctx, caller: identity_pb2.RefreshTokenRequest(refresh_token=ctx.refresh_tokens.pop()),
                everyone(Ok(account_of("A"))),
            ),
        ],
        "IdentityService.GetCurrentAccount": [
            Row(
                "the caller's account",
                lambda ctx, caller: identity_pb2.GetCurrentAccountRequest(),
                signed_in(Ok(is_caller)),
            ),
        ],
        "IdentityService.ListSigningKeys": [
            Row(
                "the public keys (public)",
                lambda ctx, caller: identity_pb2.ListSigningKeysRequest(),
                everyone(Ok(has_keys)),
            ),
        ],
        # Deletion would end the world's tenants: each caller is a fresh stand-in of the same role.
        "IdentityService.DeleteAccount": [
            Row(
                "customer A's account",
                lambda ctx, caller: identity_pb2.DeleteAccountRequest(name=ctx.a.customer_name),
                signed_in(NOT_OWNER),
                ghost=lambda ctx, caller: identity_pb2.DeleteAccountRequest(name="accounts/nosuchaccount0"),
                snapshot=_account_of_a,
                stand_ins=True,
            ),
            Row(
                "a malformed name",
                lambda ctx, caller: identity_pb2.DeleteAccountRequest(name="users/someone"),
                signed_in(Err(Code.INVALID_ARGUMENT, "INVALID_ARGUMENT")),
                stand_ins=True,
            ),
            Row(
                "the caller's own account",
                lambda ctx, caller: identity_pb2.DeleteAccountRequest(name=ctx.account(caller)),
                signed_in(OK),
                stand_ins=True,
            ),
        ],
    }


async def _account_of_a(ctx: Ctx) -> object:
    found = await aio(ctx.a.customer, "identity").GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=ctx.a.customer.metadata
    )
    return found.SerializeToString(deterministic=True)


def _register(instance_id: str, secret: str = SECRET, address: str = "") -> Callable[[Ctx, str], Message]:
    def build(ctx: Ctx, caller: str) -> Message:
        return instance_pb2.RegisterInstanceRequest(
            instance_id=instance_id or ctx.unique("authz-new"),
            address=address or ctx.world.aiida.address,
            instance_secret=secret,
            pairing_code="PAIR-123456",
        )

    return build


def _claim(instance_of_tenant: str, code: str = "") -> Callable[[Ctx, str], Message]:
    def build(ctx: Ctx, caller: str) -> Message:
        t = ctx.tenant(instance_of_tenant)
        return instance_pb2.ClaimInstanceRequest(
            instance_id=t.instance_id, pairing_code=code or t.pairing_code
        )

    return build


def instance_rows() -> dict[str, list[Row]]:
    def register(own: str) -> list[Row]:
        instance_id = "fuzz-claimed-1" if own == "A" else "authz-b-1"
        return [
            # Trust on first use: another secret can neither take over nor move the instance.
            Row(
                f"{own}'s instance id with another secret",
                _register(instance_id, secret="h" * 40, address="127.0.0.1:9"),
                everyone(Err(Code.PERMISSION_DENIED, "INSTANCE_SECRET_MISMATCH")),
                snapshot=lambda ctx: _instance_row(ctx, instance_id),
            ),
            # The device's own restart (its secret, same address) keeps the owner.
            Row(
                f"{own}'s instance id with its secret",
                _register(instance_id),
                everyone(Ok(registered_owned_by(own))),
            ),
        ]

    def claim(own: str) -> list[Row]:
        instance_id = "fuzz-claimed-1" if own == "A" else "authz-b-1"
        snapshot = lambda ctx: _instance_row(ctx, instance_id)  # noqa: E731
        return [
            # API.md: claimed by another customer is ALREADY_EXISTS, a wrong code PERMISSION_DENIED;
            # retrying one's own claim is a no-op. Either way the owner stays.
            Row(
                f"{own}'s instance, its pairing code",
                _claim(own),
                by_tenant(
                    own,
                    customer=Ok(instance_of(own)),
                    ep=ROLE,
                    other_customer=Err(Code.ALREADY_EXISTS, "INSTANCE_ALREADY_CLAIMED"),
                    other_ep=ROLE,
                ),
                snapshot=snapshot,
            ),
            Row(
                f"{own}'s instance, a wrong pairing code",
                _claim(own, code="WRONG-0000"),
                by_tenant(
                    own,
                    customer=Ok(instance_of(own)),
                    ep=ROLE,
                    other_customer=Err(Code.PERMISSION_DENIED, "INVALID_PAIRING_CODE"),
                    other_ep=ROLE,
                ),
                snapshot=snapshot,
            ),
        ]

    def get(own: str) -> list[Row]:
        # EPs never see instances, not even one they hold a permission on.
        return [
            Row(
                f"{own}'s instance",
                lambda ctx, caller: instance_pb2.GetInstanceRequest(name=ctx.tenant(own).instance),
                by_tenant(
                    own,
                    customer=Ok(instance_of(own)),
                    ep=nf("INSTANCE_NOT_FOUND"),
                    other_customer=nf("INSTANCE_NOT_FOUND"),
                    other_ep=nf("INSTANCE_NOT_FOUND"),
                ),
                ghost=lambda ctx, caller: instance_pb2.GetInstanceRequest(name=GHOST_INSTANCE),
            )
        ]

    unclaimed = "fuzz-unclaimed-1"
    return {
        "InstanceService.RegisterInstance": [
            Row("a new instance id (public)", _register(""), everyone(Ok(registered_unclaimed))),
            *both(register),
        ],
        "InstanceService.ClaimInstance": [
            *both(claim),
            Row(
                "an unclaimed instance, a wrong pairing code",
                lambda ctx, caller: instance_pb2.ClaimInstanceRequest(
                    instance_id=unclaimed, pairing_code="WRONG-0000"
                ),
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: Err(Code.PERMISSION_DENIED, "INVALID_PAIRING_CODE"),
                    CUSTOMER_B: Err(Code.PERMISSION_DENIED, "INVALID_PAIRING_CODE"),
                    EP_A: ROLE,
                    EP_B: ROLE,
                },
                snapshot=lambda ctx: _instance_row(ctx, unclaimed),
            ),
            Row(
                "an unknown instance id",
                lambda ctx, caller: instance_pb2.ClaimInstanceRequest(
                    instance_id="no-such-instance", pairing_code="ABCDEF-123"
                ),
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: nf("INSTANCE_NOT_FOUND"),
                    CUSTOMER_B: nf("INSTANCE_NOT_FOUND"),
                    EP_A: ROLE,
                    EP_B: ROLE,
                },
            ),
        ],
        "InstanceService.GetInstance": [
            *both(get),
            Row(
                "an unclaimed instance",
                lambda ctx, caller: instance_pb2.GetInstanceRequest(name=f"instances/{unclaimed}"),
                signed_in(nf("INSTANCE_NOT_FOUND")),
                ghost=lambda ctx, caller: instance_pb2.GetInstanceRequest(name=GHOST_INSTANCE),
            ),
        ],
        "InstanceService.ListInstances": [
            Row(
                "the caller's instances",
                lambda ctx, caller: instance_pb2.ListInstancesRequest(),
                signed_in(Ok(own_instances)),
            ),
        ],
    }


def data_request_rows() -> dict[str, list[Row]]:
    def create(own: str) -> list[Row]:
        # Idempotency keys are per caller: reusing another EP's request_id creates one's own request.
        return [
            Row(
                f"replaying {own}'s request_id",
                lambda ctx, caller: data_request_pb2.CreateDataRequestRequest(
                    data_request=_data_request_body(), request_id=ctx.tenant(own).dr_request_id
                ),
                by_tenant(
                    own,
                    customer=ROLE,
                    ep=Ok(replayed(own)),
                    other_customer=ROLE,
                    other_ep=Ok(created_by_caller),
                ),
            )
        ]

    def get(own: str) -> list[Row]:
        # API.md: GetDataRequest/ListDataRequests are for "anyone signed in": data requests are public.
        return [
            Row(
                f"{own}'s data request (public to the signed-in)",
                lambda ctx, caller: data_request_pb2.GetDataRequestRequest(name=ctx.tenant(own).data_request),
                signed_in(Ok(is_data_request(own))),
            )
        ]

    def list_owner(own: str) -> list[Row]:
        return [
            Row(
                f"browsing filtered to owner {own}",
                lambda ctx, caller: data_request_pb2.ListDataRequestsRequest(
                    owner=ctx.tenant(own).ep_name, page_size=100
                ),
                signed_in(Ok(lists_owned_by(own))),
            )
        ]

    def close(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s data request",
                lambda ctx, caller: data_request_pb2.CloseDataRequestRequest(name=ctx.tenant(own).close_me),
                by_tenant(own, customer=ROLE, ep=Ok(closed), other_customer=ROLE, other_ep=NOT_OWNER),
                snapshot=lambda ctx: _data_request(ctx.tenant(own), ctx.tenant(own).close_me),
            )
        ]

    def search(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s data request",
                lambda ctx, caller: data_request_pb2.SearchInstancesRequest(
                    data_request=ctx.tenant(own).data_request, timeout=Duration(seconds=1)
                ),
                by_tenant(own, customer=ROLE, ep=Ok(searched(own)), other_customer=ROLE, other_ep=NOT_OWNER),
                snapshot=lambda ctx: _search_count(ctx, ctx.tenant(own)),
            )
        ]

    def get_search(own: str) -> list[Row]:
        other = "B" if own == "A" else "A"
        ghost: Build = lambda ctx, caller: data_request_pb2.GetSearchRequest(  # noqa: E731
            name=f"{ctx.tenant(own).data_request}/searches/nosuchsearch"
        )
        return [
            Row(
                f"{own}'s search",
                lambda ctx, caller: data_request_pb2.GetSearchRequest(name=ctx.tenant(own).search),
                by_tenant(
                    own,
                    customer=nf("SEARCH_NOT_FOUND"),
                    ep=Ok(is_search(own)),
                    other_customer=nf("SEARCH_NOT_FOUND"),
                    other_ep=nf("SEARCH_NOT_FOUND"),
                ),
                ghost=ghost,
            ),
            # A search id under another data request's name is not found, for everyone.
            Row(
                f"{own}'s search id under {other}'s data request",
                lambda ctx, caller: data_request_pb2.GetSearchRequest(
                    name=ctx.tenant(other).data_request
                    + "/searches/"
                    + ctx.tenant(own).search.rsplit("/", 1)[1]
                ),
                signed_in(nf("SEARCH_NOT_FOUND")),
                ghost=ghost,
            ),
        ]

    return {
        "DataRequestService.CreateDataRequest": [
            Row(
                "a new data request",
                lambda ctx, caller: data_request_pb2.CreateDataRequestRequest(
                    data_request=_data_request_body("Matrix")
                ),
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: ROLE,
                    CUSTOMER_B: ROLE,
                    EP_A: Ok(created_by_caller),
                    EP_B: Ok(created_by_caller),
                },
            ),
            *both(create),
        ],
        "DataRequestService.GetDataRequest": both(get),
        "DataRequestService.ListDataRequests": [
            Row(
                "browsing everything",
                lambda ctx, caller: data_request_pb2.ListDataRequestsRequest(page_size=100),
                signed_in(Ok(lists_both_tenants)),
            ),
            *both(list_owner),
        ],
        "DataRequestService.CloseDataRequest": both(close),
        "DataRequestService.SearchInstances": both(search),
        "DataRequestService.GetSearch": both(get_search),
    }


def _permission_rows(
    rpc_request: Callable[[str], Message],
    target: str,
    expect: Callable[[str], dict[str, Expect]],
    label: str,
) -> list[Row]:
    """Rows for a permission-naming RPC on tenant A's and B's `target` permission, with ghosts."""

    def make(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s {label}",
                lambda ctx, caller: rpc_request(getattr(ctx.tenant(own), target)),
                expect(own),
                snapshot=lambda ctx: _permission(ctx.tenant(own), getattr(ctx.tenant(own), target)),
                ghost=lambda ctx, caller: rpc_request(GHOST_PERMISSION),
            )
        ]

    return both(make)


def access_rows() -> dict[str, list[Row]]:
    def request_access(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s data request and instance",
                lambda ctx, caller: _access_request(ctx.tenant(own)),
                by_tenant(own, customer=ROLE, ep=Ok(requested(own)), other_customer=ROLE, other_ep=NOT_OWNER),
                snapshot=lambda ctx: _permissions_of(ctx.tenant(own)),
            ),
            # Idempotency keys are per caller: another EP replaying A's request_id gets no A permissions.
            Row(
                f"replaying {own}'s request_id",
                lambda ctx, caller: _access_request(ctx.tenant(own), ctx.tenant(own).access_request_id),
                by_tenant(
                    own, customer=ROLE, ep=Ok(replayed_access(own)), other_customer=ROLE, other_ep=NOT_OWNER
                ),
                snapshot=lambda ctx: _permissions_of(ctx.tenant(own)),
            ),
        ]

    def get_permission(target: str, label: str) -> list[Row]:
        return _permission_rows(
            lambda name: access_pb2.GetPermissionRequest(name=name),
            target,
            lambda own: by_tenant(
                own,
                customer=Ok(is_permission(lambda ctx: getattr(ctx.tenant(own), target))),
                ep=Ok(is_permission(lambda ctx: getattr(ctx.tenant(own), target))),
                other_customer=nf("PERMISSION_NOT_FOUND"),
                other_ep=nf("PERMISSION_NOT_FOUND"),
            ),
            label,
        )

    def list_filtered(own: str) -> list[Row]:
        # Filtering by someone else's (public) data request is allowed and shows none of its permissions.
        return [
            Row(
                f"filtered to {own}'s data request",
                lambda ctx, caller: access_pb2.ListPermissionsRequest(
                    data_request=ctx.tenant(own).data_request
                ),
                signed_in(Ok(own_permissions(own))),
            )
        ]

    def list_page(own: str) -> list[Row]:
        # Page tokens are bound to the account that listed: nobody continues another's listing.
        invalid = Err(Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        return [
            Row(
                f"{own}'s EP's page token",
                lambda ctx, caller: access_pb2.ListPermissionsRequest(
                    page_size=1, page_token=ctx.tenant(own).permissions_page_token
                ),
                by_tenant(
                    own, customer=invalid, ep=Ok(page_continues), other_customer=invalid, other_ep=invalid
                ),
            )
        ]

    def watch(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s data request",
                lambda ctx, caller: access_pb2.WatchPermissionsRequest(
                    data_request=ctx.tenant(own).data_request
                ),
                by_tenant(own, customer=ROLE, ep=Ok(watched(own)), other_customer=ROLE, other_ep=NOT_OWNER),
            )
        ]

    return {
        "AccessService.RequestAccess": both(request_access),
        "AccessService.GetPermission": get_permission("pending", "pending permission")
        + get_permission("accepted", "accepted permission"),
        "AccessService.ListPermissions": [
            Row(
                "the caller's permissions",
                lambda ctx, caller: access_pb2.ListPermissionsRequest(),
                signed_in(Ok(own_permissions())),
            ),
            *both(list_filtered),
            *both(list_page),
        ],
        "AccessService.WatchPermissions": [
            Row(
                "the caller's permissions",
                lambda ctx, caller: access_pb2.WatchPermissionsRequest(),
                {ANON: UNAUTH, CUSTOMER_A: ROLE, CUSTOMER_B: ROLE, EP_A: Ok(watched()), EP_B: Ok(watched())},
            ),
            *both(watch),
        ],
        "AccessService.TerminatePermission": _permission_rows(
            lambda name: access_pb2.TerminatePermissionRequest(name=name, reason="no longer needed"),
            "terminate_me",
            lambda own: by_tenant(
                own,
                customer=ROLE,
                ep=Ok(in_state(Permission.STATE_TERMINATED)),
                other_customer=ROLE,
                other_ep=nf("PERMISSION_NOT_FOUND"),
            ),
            "accepted permission",
        ),
    }


def consent_rows() -> dict[str, list[Row]]:
    def connect_decision(own: str) -> list[Row]:
        return [
            Row(
                f"a decision on {own}'s pending permission",
                lambda ctx, caller: [
                    consent_pb2.ConnectRequest(
                        decision=consent_pb2.Decision(permission=ctx.tenant(own).connect_me, approve=False)
                    )
                ],
                by_tenant(
                    own,
                    customer=Ok(decided_on_stream(own)),
                    ep=ROLE,
                    # In band: the stream stays open and the decision gets DecideAccess's NOT_FOUND.
                    other_customer=Ok(refused_on_stream(own), inband_refusal=True),
                    other_ep=ROLE,
                ),
                snapshot=lambda ctx: _permission(ctx.tenant(own), ctx.tenant(own).connect_me),
                ghost=lambda ctx, caller: [
                    consent_pb2.ConnectRequest(decision=consent_pb2.Decision(permission=GHOST_PERMISSION))
                ],
            )
        ]

    def activities(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s instance",
                lambda ctx, caller: consent_pb2.ListActivitiesRequest(instance=ctx.tenant(own).instance),
                by_tenant(
                    own,
                    customer=Ok(feed_of(own)),
                    ep=ROLE,
                    other_customer=nf("INSTANCE_NOT_FOUND"),
                    other_ep=ROLE,
                ),
                ghost=lambda ctx, caller: consent_pb2.ListActivitiesRequest(instance=GHOST_INSTANCE),
            )
        ]

    return {
        "ConsentService.Connect": [
            Row(
                "the caller's consent channel",
                lambda ctx, caller: [],
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: Ok(consent_channel),
                    CUSTOMER_B: Ok(consent_channel),
                    EP_A: ROLE,
                    EP_B: ROLE,
                },
            ),
            *both(connect_decision),
        ],
        "ConsentService.DecideAccess": _permission_rows(
            lambda name: consent_pb2.DecideAccessRequest(permission=name, approve=False, reason="no thanks"),
            "decide_me",
            lambda own: by_tenant(
                own,
                customer=Ok(in_state(Permission.STATE_REJECTED)),
                ep=ROLE,
                other_customer=nf("PERMISSION_NOT_FOUND"),
                other_ep=ROLE,
            ),
            "pending permission",
        ),
        "ConsentService.ListActivities": both(activities),
        "ConsentService.ListConsentReceipts": [
            Row(
                "the caller's chain",
                lambda ctx, caller: consent_pb2.ListConsentReceiptsRequest(page_size=500),
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: Ok(own_receipts),
                    CUSTOMER_B: Ok(own_receipts),
                    EP_A: ROLE,
                    EP_B: ROLE,
                },
            )
        ],
        # The one ConsentService RPC open to eligible parties: a permission's EP may prove its consent.
        "ConsentService.GetConsentReceipt": _permission_rows(
            lambda name: consent_pb2.GetConsentReceiptRequest(permission=name),
            "accepted",
            lambda own: by_tenant(
                own,
                customer=Ok(receipt_of(own)),
                ep=Ok(receipt_of(own)),
                other_customer=nf("CONSENT_RECEIPT_NOT_FOUND"),
                other_ep=nf("CONSENT_RECEIPT_NOT_FOUND"),
            ),
            "accepted permission",
        )
        + _permission_rows(
            lambda name: consent_pb2.GetConsentReceiptRequest(permission=name),
            "pending",
            lambda own: {**signed_in(nf("CONSENT_RECEIPT_NOT_FOUND"))},
            "undecided permission",
        ),
        "ConsentService.RevokePermission": _permission_rows(
            lambda name: consent_pb2.RevokePermissionRequest(name=name, reason="changed my mind"),
            "revoke_me",
            lambda own: by_tenant(
                own,
                customer=Ok(in_state(Permission.STATE_REVOKED)),
                ep=ROLE,
                other_customer=nf("PERMISSION_NOT_FOUND"),
                other_ep=ROLE,
            ),
            "accepted permission",
        ),
    }


MATRIX: dict[str, list[Row]] = {
    **identity_rows(),
    **instance_rows(),
    **data_request_rows(),
    **access_rows(),
    **consent_rows(),
}


def _key(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


# (rpc, target, caller) -> outcome label, printed with `pytest -s`
SUMMARY: list[tuple[str, str, str, str]] = []


async def test_matrix_names_only_rpcs_that_exist() -> None:
    assert set(MATRIX) <= {_key(m) for m, _ in RPCS}, "rows for RPCs the services no longer have"
    for rpc, rows in MATRIX.items():
        assert rows, rpc
        for row in rows:
            assert set(row.expect) == set(CALLERS), (
                f"{rpc} [{row.target}]: not every caller has an expectation"
            )


@pytest.mark.parametrize(("method", "attr"), RPCS, ids=[_key(m) for m, _ in RPCS])
async def test_authorization(ctx: Ctx, method: MethodDescriptor, attr: str) -> None:
    rpc = _key(method)
    rows = MATRIX.get(rpc)
    assert rows, f"{rpc} has no rows in MATRIX: say who may call it, on whose objects"
    problems: list[str] = []
    for row in rows:
        problems += await _run_row(ctx, rpc, method, attr, row)
    print()
    for r, target, caller, label in SUMMARY:
        if r == rpc:
            print(f"authz {rpc:40} {target:48} {caller:11} {label}")
    assert not problems, f"{rpc}:\n" + "\n".join(problems)


async def _run_row(ctx: Ctx, rpc: str, method: MethodDescriptor, attr: str, row: Row) -> list[str]:
    if not row.stand_ins:
        return await _run_row_as_callers(ctx, rpc, method, attr, row)
    market = ctx.world.market
    roles = {CUSTOMER_A: identity_pb2.ROLE_CUSTOMER, CUSTOMER_B: identity_pb2.ROLE_CUSTOMER}
    ctx.stand_ins = {
        caller: await market.signup(roles.get(caller, identity_pb2.ROLE_ELIGIBLE_PARTY))
        for caller in CALLERS
        if caller != ANON
    }
    try:
        return await _run_row_as_callers(ctx, rpc, method, attr, row)
    finally:
        ctx.stand_ins = {}


async def _run_row_as_callers(ctx: Ctx, rpc: str, method: MethodDescriptor, attr: str, row: Row) -> list[str]:
    problems: list[str] = []
    refused = [c for c in CALLERS if not _allows(row.expect[c])]
    allowed = [c for c in CALLERS if _allows(row.expect[c])]
    before = await row.snapshot(ctx) if row.snapshot else None
    for caller in refused + allowed:  # refusals first: a target consumed by its owner is seen unchanged
        if row.snapshot and allowed and caller == allowed[0]:
            problems += _unchanged(row, before, await row.snapshot(ctx))
        outcome = await invoke(ctx, method, attr, caller, row.build(ctx, caller))
        SUMMARY.append((rpc, row.target, caller, outcome.label))
        problem = judge(ctx, caller, row.expect[caller], outcome)
        if problem:
            problems.append(f"  [{row.target}] as {caller}: {problem}")
        if row.ghost is not None and caller in refused:
            ghost = await invoke(ctx, method, attr, caller, row.ghost(ctx, caller))
            if signature(ghost) != signature(outcome):
                problems.append(
                    f"  [{row.target}] as {caller}: tells the object exists: "
                    f"{signature(outcome)} vs a missing one {signature(ghost)}"
                )
    if row.snapshot and not allowed:
        problems += _unchanged(row, before, await row.snapshot(ctx))
    return problems


def _allows(expect: Expect) -> bool:
    return isinstance(expect, Ok) and not expect.inband_refusal


def _unchanged(row: Row, before: object, after: object) -> list[str]:
    if before == after:
        return []
    return [f"  [{row.target}] refused calls changed the target:\n    before {before}\n    after  {after}"]


# --- live streams: events of one tenant never reach the other's streams ---


async def _until(call: Any, predicate: Callable[[Any], bool], seen: list[Any]) -> Any:
    async with asyncio.timeout(FIRST_MESSAGE):
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF, f"the stream ended; it had sent {seen}"
            seen.append(message)
            if predicate(message):
                return message


async def _quiet_period(call: Any, seen: list[Any], seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            while (message := await call.read()) is not grpc.aio.EOF:
                seen.append(message)
    except TimeoutError:
        pass


def _permissions_in(messages: list[Any]) -> list[Permission]:
    found: list[Permission] = []
    for m in messages:
        if isinstance(m, access_pb2.PermissionEvent):
            found.append(m.permission)
        elif m.HasField("access_request"):
            found.append(m.access_request.permission)
        elif m.HasField("permission_update"):
            found.append(m.permission_update)
    return found


@pytest.mark.parametrize("actor", ["A", "B"])
async def test_live_streams_never_carry_another_tenants_events(ctx: Ctx, actor: str) -> None:
    """A new access request and its decision reach the actor's streams and nobody else's."""
    t, other = (ctx.a, ctx.b) if actor == "A" else (ctx.b, ctx.a)
    calls: dict[str, Any] = {
        "own_watch": aio(t.ep, "access").WatchPermissions(
            access_pb2.WatchPermissionsRequest(), metadata=t.ep.metadata
        ),
        "own_consent": aio(t.customer, "consent").Connect(metadata=t.customer.metadata),
        "other_watch": aio(other.ep, "access").WatchPermissions(
            access_pb2.WatchPermissionsRequest(), metadata=other.ep.metadata
        ),
        "other_consent": aio(other.customer, "consent").Connect(metadata=other.customer.metadata),
    }
    seen: dict[str, list[Any]] = {name: [] for name in calls}
    try:
        for name in ("own_consent", "other_consent"):
            await _until(calls[name], lambda m: m.HasField("ready"), seen[name])
        for name in ("own_watch", "other_watch"):
            await _until(calls[name], lambda m: True, seen[name])  # the snapshot has begun
        for name in calls:
            seen[name].clear()

        new = await _pending(t)
        await _until(calls["own_watch"], lambda m: m.permission.name == new, seen["own_watch"])
        await _until(
            calls["own_consent"],
            lambda m: m.HasField("access_request") and m.access_request.permission.name == new,
            seen["own_consent"],
        )
        await aio(t.customer, "consent").DecideAccess(
            consent_pb2.DecideAccessRequest(permission=new, approve=False), metadata=t.customer.metadata
        )
        rejected = Permission.STATE_REJECTED
        await _until(
            calls["own_watch"],
            lambda m: m.permission.name == new and m.permission.state == rejected,
            seen["own_watch"],
        )
        await _until(
            calls["own_consent"],
            lambda m: m.HasField("permission_update") and m.permission_update.state == rejected,
            seen["own_consent"],
        )
        for name in ("other_watch", "other_consent"):
            await _quiet_period(calls[name], seen[name], STREAM_IDLE)
    finally:
        for call in calls.values():
            call.cancel()

    for name, account in (("other_watch", other.ep_name), ("other_consent", other.customer_name)):
        leaked = [
            p.name for p in _permissions_in(seen[name]) if account not in (p.customer, p.eligible_party)
        ]
        assert not leaked, f"{name} carried another tenant's permissions: {leaked}"
        assert new not in {p.name for p in _permissions_in(seen[name])}
    for name, account in (("own_watch", t.ep_name), ("own_consent", t.customer_name)):
        assert all(account in (p.customer, p.eligible_party) for p in _permissions_in(seen[name]))


# --- the EP sink: readings are listed to the permission's eligible party only ---


async def _sink_token(ctx: Ctx, t: Tenant, permission_id: str) -> str:
    """The sink token the marketplace issued for the permission (sent to the AIIDA double)."""
    double = ctx.world.aiida.double

    def delivered() -> list[str]:
        return [d.sink_token for d in double.configured(t.instance_id) if d.permission_id == permission_id]

    await double.until(lambda: bool(delivered()))
    return delivered()[0]


async def _list(
    sink: RunningSink, caller_token: str | None, permission_id: str, page_token: str = ""
) -> Outcome:
    request = data_sink_pb2.ListReadingsRequest(
        permission_id=permission_id, page_size=1, page_token=page_token
    )
    try:
        response = await sink.stub.ListReadings(request, metadata=bearer(caller_token), timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        return Outcome([], exc)
    return Outcome([response], None)


async def test_sink_lists_readings_only_to_the_permissions_eligible_party(ctx: Ctx, tmp_path: Path) -> None:
    """With tokens of the real marketplace: the owner pages through, everyone else sees "not found".

    tests/eddie_sink/test_auth.py covers another EP and bad tokens against a marketplace double;
    added here: real marketplace-issued tokens, the permission's own customer, another EP holding
    the owner's page token, and that the refusal is identical to that of an unknown permission.
    """
    a = ctx.a
    permission_id = a.accepted.removeprefix("permissions/")
    token = await _sink_token(ctx, a, permission_id)
    sink = await start_sink(sink_config(tmp_path, ctx.world.market.address))
    try:
        assert await sink.publish(token, [reading(s, permission_id=permission_id) for s in range(3)]) == 3
        tokens = {caller: ctx.client(caller).token or None for caller in CALLERS}
        first = await _list(sink, tokens[EP_A], permission_id)
        assert judge(ctx, EP_A, OK, first) == ""
        page_token = first.responses[0].next_page_token
        assert len(first.responses[0].readings) == 1 and page_token
        assert len(await sink.list_all(tokens[EP_A] or "", permission_id)) == 3

        missing = nf("PERMISSION_NOT_FOUND")
        expect = {ANON: UNAUTH, CUSTOMER_A: missing, CUSTOMER_B: missing, EP_B: missing}
        problems = []
        for caller, expected in expect.items():
            for page in ("", page_token):
                outcome = await _list(sink, tokens[caller], permission_id, page)
                ghost = await _list(sink, tokens[caller], "nosuchpermission0", page)
                target = f"A's readings{' with the owner page token' if page else ''}"
                print(f"authz {'DataSinkService.ListReadings':40} {target:48} {caller:11} {outcome.label}")
                problem = judge(ctx, caller, expected, outcome, domain="framework.eddie")
                if problem:
                    problems.append(f"{caller} page={bool(page)}: {problem}")
                if signature(outcome) != signature(ghost):
                    problems.append(f"{caller}: {signature(outcome)} differs from unknown {signature(ghost)}")
        assert not problems, "\n".join(problems)
    finally:
        await sink.close()
