"""The authorization matrix's world: two tenants and their objects, and calling, judging and
comparing a call with a ghost (see tests/security/authorization)."""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2
from eddie_client.client import Session
from eddie_common.interceptors import error_info
from tests.support.world import SINK_URI, World, data_need

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

    customer: Session
    ep: Session
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
    stand_ins: dict[str, Session] = field(default_factory=dict)  # caller -> who plays them (one row)

    def tenant(self, label: str) -> Tenant:
        return self.a if label == "A" else self.b

    def client(self, caller: str) -> Session:
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


def _account(client: Session) -> str:
    assert client.account is not None
    return client.account.name


def data_request_body(title: str = "Heat pump study") -> DataRequest:
    return DataRequest(title=title, purpose="Grid planning research", data_need=data_need())


async def _create_data_request(ep: Session, request_id: str = "") -> str:
    created = await ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(data_request=data_request_body(), request_id=request_id),
        metadata=ep.metadata,
    )
    return str(created.name)


async def _search(ep: Session, data_request: str) -> str:
    search = ""
    async for response in ep.data_requests.SearchInstances(
        data_request_pb2.SearchInstancesRequest(data_request=data_request, timeout=Duration(seconds=1)),
        metadata=ep.metadata,
    ):
        if response.HasField("summary"):
            search = response.summary.search
    assert search, "the search stored nothing"
    return search


def access_request(t: Tenant, request_id: str = "") -> access_pb2.RequestAccessRequest:
    return access_pb2.RequestAccessRequest(
        data_request=t.data_request, instance_ids=[t.instance_id], sink_uri=SINK_URI, request_id=request_id
    )


async def _request_access(t: Tenant, request_id: str = "") -> list[str]:
    response = await t.ep.access.RequestAccess(access_request(t, request_id), metadata=t.ep.metadata)
    return [p.name for p in response.permissions]


async def new_pending(t: Tenant, fresh: bool = True) -> str:
    """A new pending permission on the tenant's instance. One data request gives an instance one live
    permission (API.md, RequestAccess), so each but the first is asked under a data request of its own."""
    if not fresh:
        return (await _request_access(t))[0]
    data_request = await _create_data_request(t.ep)
    await _search(t.ep, data_request)
    response = await t.ep.access.RequestAccess(
        access_pb2.RequestAccessRequest(
            data_request=data_request, instance_ids=[t.instance_id], sink_uri=SINK_URI
        ),
        metadata=t.ep.metadata,
    )
    return str(response.permissions[0].name)


async def _accepted(t: Tenant) -> str:
    name = await new_pending(t)
    await t.customer.consent.DecideAccess(
        consent_pb2.DecideAccessRequest(permission=name, approve=True), metadata=t.customer.metadata
    )
    return name


async def build_tenant(customer: Session, ep: Session, instance_id: str) -> Tenant:
    t = Tenant(customer, ep, instance_id)
    t.data_request = await _create_data_request(ep)
    t.search = await _search(ep, t.data_request)
    t.pending = await new_pending(t, fresh=False)
    t.accepted = await _accepted(t)
    t.close_me = await _create_data_request(ep)
    t.decide_me = await new_pending(t)
    t.revoke_me = await _accepted(t)
    t.terminate_me = await _accepted(t)
    t.connect_me = await new_pending(t)
    t.dr_request_id = str(uuid.uuid4())
    t.dr_replayed = await _create_data_request(ep, t.dr_request_id)
    t.access_request_id = str(uuid.uuid4())
    t.access_replayed = tuple(await _request_access(t, t.access_request_id))
    listed = await ep.access.ListPermissions(
        access_pb2.ListPermissionsRequest(page_size=1), metadata=ep.metadata
    )
    t.permissions_page_token = listed.next_page_token
    assert t.permissions_page_token
    return t


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
            errors = [r.decision_error for r in self.responses if is_decision_error(r)]
            inband = "".join(f" +decision_error {_code_name(e.code)}/{e.reason}" for e in errors)
            return f"OK({len(self.responses)}){inband}"
        info = error_info(self.error)
        return f"{self.error.code().name}/{info.reason if info else '-'}"


def _code_name(value: int) -> str:
    return next((c.name for c in Code if c.value[0] == value), str(value))


def is_decision_error(response: Any) -> bool:
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
    errors = [r.decision_error for r in outcome.responses if is_decision_error(r)]
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
