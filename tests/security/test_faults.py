"""Faults the marketplace must survive, each with the property that breaks if it does not.

1. Hostile AIIDAs on the Connect stream (slow, flooding, wrong query ids,
   malformed bytes, killed or frozen mid-search): the misbehaving instance is
   counted as what it is, loses at most its own stream, and every well-behaved
   instance's answer is still exactly right.
2. A marketplace SIGKILLed while customers approve: after a restart on the same
   data directory no accepted decision is lost or duplicated, every approving
   AIIDA holds each permission once, and readings reach the sink, unique.
3. PostgreSQL stopped under a running marketplace: UNAVAILABLE with an ErrorInfo
   reason (not INTERNAL) within a bounded time, health still answers, and the
   same process recovers when the database is back.
4. SIGTERM under load: in-flight calls finish, health goes NOT_SERVING, new calls
   are refused, the process exits 0 within the grace period.

Everything runs over real gRPC (servers on port 0, generated stubs); the slow
cases start real processes and are marked `slow`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import (
    access_pb2,
    access_pb2_grpc,
    consent_pb2,
    consent_pb2_grpc,
    data_request_pb2,
    data_request_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    instance_pb2,
    instance_pb2_grpc,
)
from eddie_client import procs
from eddie_client.client import (
    ROLE_CUSTOMER,
    ROLE_ELIGIBLE_PARTY,
    MarketplaceClient,
    Session,
    data_need,
    duration,
    list_readings,
)
from eddie_common.interceptors import error_info
from eddie_common.tokens import AUDIENCE_AIIDA, SigningKey, TokenIssuer
from marketplace_server.aiida.link import MAX_UNSOLICITED_PER_MINUTE
from marketplace_server.config import Config
from marketplace_server.server import Marketplace
from marketplace_server.services.statuses import WORKERS as STATUS_WORKERS
from tests.conftest import (
    POSTGRES_URL,
    Client,
    _postgres_execute,
    postgres_reachable,
    start_marketplace,
    test_config,
)
from tests.e2e.fleet import start_aiida
from tests.helpers import eventually, expect_error
from tests.security.hostile_aiida import (
    Flood,
    Garbage,
    HostileAiida,
    Script,
    Silent,
    Slow,
    StatusFlood,
    WrongIds,
    reply,
    status,
)

DataAccess = aiida_pb2.DataAccess
Permission = access_pb2.Permission
SINK_URI = "grpc://127.0.0.1:50099"
STATUS_FLOOD = 6000
PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"
SECRET = "fault-secret-" + "f" * 32
PASSWORD = "correct horse battery staple"
# Four honest instances on one port: two match the need, two do not.
HONEST = {"honest-match-1": True, "honest-match-2": True, "honest-miss-1": False, "honest-miss-2": False}
EXPECTED = {i for i, matched in HONEST.items() if matched}
NEED = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400, ["AT"])  # vienna-p1 matches it


# The shared test Client types its stubs as the synchronous ones; these name what they are on an aio channel.
def identity_of(c: Client) -> identity_pb2_grpc.IdentityServiceAsyncStub:
    return cast("identity_pb2_grpc.IdentityServiceAsyncStub", c.identity)


def instances_of(c: Client) -> instance_pb2_grpc.InstanceServiceAsyncStub:
    return cast("instance_pb2_grpc.InstanceServiceAsyncStub", c.instances)


def data_requests_of(c: Client) -> data_request_pb2_grpc.DataRequestServiceAsyncStub:
    return cast("data_request_pb2_grpc.DataRequestServiceAsyncStub", c.data_requests)


def access_of(c: Client) -> access_pb2_grpc.AccessServiceAsyncStub:
    return cast("access_pb2_grpc.AccessServiceAsyncStub", c.access)


def consent_of(c: Client) -> consent_pb2_grpc.ConsentServiceAsyncStub:
    return cast("consent_pb2_grpc.ConsentServiceAsyncStub", c.consent)


def health_of(channel: grpc.aio.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel)  # typed for the synchronous API only


# --- the arena: a real marketplace, honest instances, an owner and an EP with an open data request ---


@dataclass
class Arena:
    channel: grpc.aio.Channel
    address: str
    app: Marketplace | None  # None: the marketplace is another process
    honest: HostileAiida
    owner: Client
    ep: Client
    data_request: data_request_pb2.DataRequest

    def linked(self, instance_id: str) -> bool:
        """The marketplace's own view (in-process only): is the instance's stream up?"""
        assert self.app is not None
        return bool(self.app.components["manager"].is_connected(instance_id))

    async def until_linked(self, instance_id: str, linked: bool = True, timeout: float = 10.0) -> None:
        if self.app is not None:
            await self.honest.until(
                lambda: self.linked(instance_id) == linked, timeout, f"{instance_id} linked"
            )
            return
        deadline = time.monotonic() + timeout
        while (
            await instances_of(self.owner).GetInstance(
                instance_pb2.GetInstanceRequest(name=f"instances/{instance_id}"), metadata=self.owner.metadata
            )
        ).connected != linked:
            assert time.monotonic() < deadline, f"{instance_id} never became connected={linked}"
            await asyncio.sleep(0.02)

    async def add(self, aiida: HostileAiida, instance_id: str, wait: bool = True) -> None:
        """Registers `instance_id` at `aiida`'s address and claims it for the owner."""
        code = f"CODE-{instance_id}"
        await instance_pb2_grpc.InstanceServiceStub(self.channel).RegisterInstance(
            instance_pb2.RegisterInstanceRequest(
                instance_id=instance_id, address=aiida.address, instance_secret=SECRET, pairing_code=code
            )
        )
        await instances_of(self.owner).ClaimInstance(
            instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code),
            metadata=self.owner.metadata,
        )
        if wait:
            await self.until_linked(instance_id)

    async def search(self, timeout: float) -> tuple[list[str], data_request_pb2.SearchSummary, float]:
        """One search; the matches in arrival order, the summary, and the seconds it took."""
        started = time.monotonic()
        matches: list[str] = []
        summary = None
        async for response in data_requests_of(self.ep).SearchInstances(
            data_request_pb2.SearchInstancesRequest(
                data_request=self.data_request.name, timeout=duration(timeout)
            ),
            metadata=self.ep.metadata,
            timeout=timeout + 10,
        ):
            if response.HasField("matches"):
                matches.extend(response.matches.instance_ids)
            else:
                assert summary is None, "a second summary"
                summary = response.summary
        assert summary is not None, "no summary"
        return matches, summary, time.monotonic() - started

    def assert_honest_untouched(self) -> None:
        """No honest instance's stream was ever dropped or reopened, and all are linked."""
        for instance_id in HONEST:
            assert self.honest.opened[instance_id] == 1, f"{instance_id} was reconnected"
            assert self.honest.closed[instance_id] == 0, f"{instance_id}'s stream was closed"
            assert self.app is None or self.linked(instance_id), f"{instance_id} is not linked"


def assert_exact(
    matches: list[str],
    summary: data_request_pb2.SearchSummary,
    *,
    hostile: int,
    matched: set[str] = EXPECTED,
    not_matched: int = len(HONEST) - len(EXPECTED),
    unreachable: int = 0,
    timed_out: int = 0,
) -> None:
    """The honest instances' answers are exactly right, and the hostile ones are counted as given."""
    assert len(matches) == len(set(matches)), f"duplicate matches: {matches}"
    assert set(matches) == matched
    counts = (summary.queried, summary.matched, summary.not_matched, summary.unreachable, summary.timed_out)
    expected = (len(HONEST) + hostile, len(matched), not_matched, unreachable, timed_out)
    assert counts == expected, (
        f"(queried, matched, not_matched, unreachable, timed_out) {counts} != {expected}"
    )


async def claim_when_registered(owner: Client, instance_id: str, code: str, timeout: float = 10.0) -> None:
    """Claims a real AIIDA, which registers itself in the background after it started listening."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await instances_of(owner).ClaimInstance(
                instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code),
                metadata=owner.metadata,
            )
            return
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def signup(channel: grpc.aio.Channel, role: int) -> Client:
    """A new account of `role` (password PASSWORD), signed in."""
    stub = identity_pb2_grpc.IdentityServiceStub(channel)
    email = f"fault-{secrets.token_hex(6)}@example.org"
    account = await stub.CreateAccount(
        identity_pb2.CreateAccountRequest(email=email, password=PASSWORD, display_name="Fault", role=role)  # type: ignore[arg-type]
    )
    token = await stub.CreateToken(identity_pb2.CreateTokenRequest(email=email, password=PASSWORD))
    return Client(channel, token.access_token, account, token.refresh_token)


def arena_config(tmp_path: Path, **overrides: Any) -> Config:
    limits: dict[str, Any] = {
        "search_rate_per_minute": 1e6,
        "claim_attempts_per_minute": 1e6,
        "login_attempts_per_minute": 1e6,
        "reconnect_max_backoff": 0.5,
    }
    return test_config(tmp_path, **{**limits, **overrides})


async def build_arena(
    channel: grpc.aio.Channel, address: str, app: Marketplace | None, honest: HostileAiida
) -> Arena:
    """An owner of the honest instances (claimed and linked) and an EP with an open data request."""
    owner, ep = await asyncio.gather(
        signup(channel, identity_pb2.ROLE_CUSTOMER), signup(channel, identity_pb2.ROLE_ELIGIBLE_PARTY)
    )
    data_request = await data_requests_of(ep).CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(title="Faults", purpose="Robustness", data_need=NEED)
        ),
        metadata=ep.metadata,
    )
    arena = Arena(channel, address, app, honest, owner, ep, data_request)
    for instance_id in HONEST:
        await arena.add(honest, instance_id)
    return arena


@pytest.fixture
async def arena(tmp_path: Path) -> AsyncIterator[Arena]:
    honest = await HostileAiida({i: Script(matched) for i, matched in HONEST.items()}).start()
    market = await start_marketplace(arena_config(tmp_path))
    try:
        yield await build_arena(market.channel, market.address, market.app, honest)
    finally:
        await market.channel.close()
        await market.app.stop(0.2)
        await honest.stop()


# --- 1. hostile AIIDAs on the Connect stream ---


async def test_a_slow_aiida_is_timed_out_and_its_late_reply_counts_for_nothing(arena: Arena) -> None:
    # Query 1 is answered "matched" after the search ended, and lands while search 2 runs; query 2
    # is answered "not matched", after the late reply; query 3 is answered "matched" at once.
    slow = Slow(delays=[1.0, 1.0, 0.0], answers=[True, False, True])
    aiida = await HostileAiida({"slow-box": slow}).start()
    try:
        await arena.add(aiida, "slow-box")
        matches, first, elapsed = await arena.search(timeout=0.5)
        assert_exact(matches, first, hostile=1, timed_out=1)
        assert elapsed < 0.5 + 0.4, "the search outlived its timeout"

        second_started = time.monotonic()
        matches, second, _ = await arena.search(timeout=3.0)
        second_ended = time.monotonic()
        assert_exact(matches, second, hostile=1, not_matched=3)
        # The test did what it says: the late "matched" arrived during search 2, before its real answer.
        late_query, late_at = slow.replied[0]
        assert late_query == slow.query_ids[0]
        assert second_started < late_at < slow.replied[1][1] < second_ended

        matches, third, _ = await arena.search(timeout=3.0)
        assert_exact(matches, third, hostile=1, matched=EXPECTED | {"slow-box"})

        stored = await data_requests_of(arena.ep).GetSearch(
            data_request_pb2.GetSearchRequest(name=first.search), metadata=arena.ep.metadata
        )
        assert set(stored.matched_instance_ids) == EXPECTED
        assert (stored.summary.matched, stored.summary.timed_out) == (2, 1)
        # A late reply is not a reason to drop the stream.
        assert (aiida.opened["slow-box"], aiida.closed["slow-box"]) == (1, 0)
        arena.assert_honest_untouched()
    finally:
        await aiida.stop()


async def test_a_flooding_aiida_loses_its_own_stream_and_nobody_else_does(arena: Arena) -> None:
    # The flooder shares the honest instances' port, so their streams share its HTTP/2 connection.
    flood = Flood()
    arena.honest.scripts["flood-box"] = flood
    await arena.add(arena.honest, "flood-box", wait=False)
    await arena.honest.until(lambda: arena.honest.closed["flood-box"] >= 1, 10, "the flooder's stream cut")
    first = arena.honest.history["flood-box"][0]
    assert first.sent > MAX_UNSOLICITED_PER_MINUTE, "cut before it flooded: the test proves nothing"
    # The flooder comes back (the link reconnects) and floods again while the searches run.
    for _ in range(3):
        matches, summary, elapsed = await arena.search(timeout=1.0)
        assert_exact(
            matches,
            summary,
            hostile=1,
            unreachable=summary.unreachable,
            timed_out=summary.timed_out,
        )
        assert summary.unreachable + summary.timed_out == 1, "the flooder is neither unreachable nor late"
        assert elapsed < 1.0 + 0.5
    # The link is kept (it reconnects: the instance may recover), but within the minute a stream
    # of the flooder is cut again at its first stray message, so a new flood costs next to nothing.
    await arena.honest.until(lambda: arena.honest.opened["flood-box"] >= 3, 5, "the flooder reconnected")
    # Its reconnect backoff keeps growing: a stream cut for flooding is no good connection.
    if arena.app is not None:
        assert arena.app.components["manager"].links["flood-box"].failed_attempts >= 2
    later = [s for s in arena.honest.history["flood-box"][1:] if s.ended.is_set()]
    assert later and all(s.sent < 200 for s in later), [s.sent for s in later]
    arena.assert_honest_untouched()
    account = await identity_of(arena.owner).GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=arena.owner.metadata
    )
    assert account.name == arena.owner.account.name  # type: ignore[union-attr]


async def test_a_status_flood_does_not_hold_up_another_instances_report(arena: Arena) -> None:
    # An accepted permission on an honest instance, configured there and waiting for its "active".
    matches, _, _ = await arena.search(timeout=3.0)
    assert "honest-match-1" in matches
    [permission] = (
        await access_of(arena.ep).RequestAccess(
            access_pb2.RequestAccessRequest(
                data_request=arena.data_request.name, instance_ids=["honest-match-1"], sink_uri=SINK_URI
            ),
            metadata=arena.ep.metadata,
        )
    ).permissions
    permission_id = permission.name.removeprefix("permissions/")
    await consent_of(arena.owner).DecideAccess(
        consent_pb2.DecideAccessRequest(permission=permission.name, approve=True),
        metadata=arena.owner.metadata,
    )
    await arena.honest.until(lambda: permission_id in arena.honest.configured, 5, "configured")
    # Another instance reports thousands of permissions it was never given, all in the same status
    # partition as the honest one (the worst case for a hash-partitioned queue).
    partition = zlib.crc32(permission_id.encode()) % STATUS_WORKERS
    ghosts = (f"ghost{i}" for i in itertools.count())
    same_partition = (g for g in ghosts if zlib.crc32(g.encode()) % STATUS_WORKERS == partition)
    flood = list(itertools.islice(same_partition, STATUS_FLOOD))
    arena.honest.scripts["status-box"] = StatusFlood(flood)
    await arena.add(arena.honest, "status-box")
    await arena.honest.until(
        lambda: arena.honest.history["status-box"][-1].sent >= STATUS_FLOOD, 20, "the flood sent"
    )
    reported = time.monotonic()
    await arena.honest.streams["honest-match-1"].send(status(permission_id, DataAccess.STATE_ACTIVE))
    while (
        await access_of(arena.ep).GetPermission(
            access_pb2.GetPermissionRequest(name=permission.name), metadata=arena.ep.metadata
        )
    ).state != Permission.STATE_ACTIVE:
        assert time.monotonic() - reported < 2.0, "the honest report waited behind the flood"
        await asyncio.sleep(0.02)
    matches, summary, elapsed = await arena.search(timeout=2.0)
    assert_exact(matches, summary, hostile=1, matched=EXPECTED | {"status-box"})
    assert elapsed < 1.0
    for ghost in flood[:50]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await access_of(arena.ep).GetPermission(
                access_pb2.GetPermissionRequest(name=f"permissions/{ghost}"), metadata=arena.ep.metadata
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    arena.assert_honest_untouched()


async def test_replies_under_unknown_query_ids_are_ignored(arena: Arena) -> None:
    liar = WrongIds()
    arena.honest.scripts["liar-box"] = liar
    await arena.add(arena.honest, "liar-box")
    for _ in range(2):
        matches, summary, _ = await arena.search(timeout=0.6)
        assert_exact(matches, summary, hostile=1, timed_out=1)
    # It did send "matched" under a finished search's id, a near-miss id, an empty and a huge one.
    assert liar.query_ids[0] in liar.sent_ids and "" in liar.sent_ids and "x" * 4096 in liar.sent_ids
    # A handful of stray replies is below the flood limit: the stream stays.
    assert (arena.honest.opened["liar-box"], arena.honest.closed["liar-box"]) == (1, 0)
    arena.assert_honest_untouched()


async def test_malformed_bytes_close_only_that_stream(arena: Arena) -> None:
    # On the honest port: bytes that are no ConnectResponse as the answer to a query, as the very
    # first message of the stream, and a well-formed answer larger than the marketplace accepts.
    huge = reply("q" * (5 * 1024 * 1024), True)
    scripts = {
        "garbage-box": Garbage(),
        "garbage-first-box": Garbage(on_open=True),
        "huge-box": Garbage(payload=huge),
    }
    arena.honest.scripts.update(scripts)
    for instance_id in scripts:
        await arena.add(arena.honest, instance_id, wait=instance_id != "garbage-first-box")
    await arena.honest.until(lambda: arena.honest.closed["garbage-first-box"] >= 1, 10, "garbage-first cut")
    for _ in range(2):
        matches, summary, elapsed = await arena.search(timeout=3.0)
        # All three are lost at once; the search does not wait for the timeout.
        assert_exact(matches, summary, hostile=3, unreachable=3)
        assert elapsed < 1.5, f"the search waited {elapsed:.2f}s for streams that had broken"
        for instance_id in ("garbage-box", "huge-box"):
            await arena.until_linked(instance_id)  # the link comes back for the next round
    for instance_id in scripts:
        assert arena.honest.closed[instance_id] >= 1, f"{instance_id}'s stream was kept"
    arena.assert_honest_untouched()
    account = await identity_of(arena.owner).GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=arena.owner.metadata
    )
    assert account.name == arena.owner.account.name  # type: ignore[union-attr]


async def test_an_instance_that_moves_while_its_stream_is_up_is_followed(arena: Arena) -> None:
    # Re-registering at a new address while the old stream still looks healthy (a NAT rebinding,
    # a half-open connection): the marketplace drops the old stream itself and dials the new one.
    old_home, new_home = Script(True), Script(True)
    old = await HostileAiida({"mover-box": old_home}).start()
    new = await HostileAiida({"mover-box": new_home}).start()
    try:
        await arena.add(old, "mover-box")
        await instance_pb2_grpc.InstanceServiceStub(arena.channel).RegisterInstance(
            instance_pb2.RegisterInstanceRequest(
                instance_id="mover-box",
                address=new.address,
                instance_secret=SECRET,
                pairing_code="CODE-mover",
            )
        )
        await new.until(lambda: new.connected("mover-box") and arena.linked("mover-box"), 5, "followed")
        assert old.closed["mover-box"] == 1 and not old.connected("mover-box")
        matches, summary, _ = await arena.search(timeout=3.0)
        assert_exact(matches, summary, hostile=1, matched=EXPECTED | {"mover-box"})
        assert (len(old_home.query_ids), len(new_home.query_ids)) == (0, 1)
        arena.assert_honest_untouched()
    finally:
        await old.stop()
        await new.stop()


async def test_an_aiida_killed_mid_search_is_unreachable_and_does_not_hold_the_search(arena: Arena) -> None:
    doomed = Silent()
    aiida = await HostileAiida({"doomed-box": doomed}).start()
    await arena.add(aiida, "doomed-box")
    search = asyncio.create_task(arena.search(timeout=5.0))
    try:
        await aiida.until(lambda: bool(doomed.query_ids), 5, "the query reached the doomed box")
        await asyncio.sleep(0.1)  # every honest instance has answered by now
        await aiida.stop(0)
        matches, summary, elapsed = await asyncio.wait_for(search, 10)
    finally:
        await aiida.stop()
    assert_exact(matches, summary, hostile=1, unreachable=1)
    assert elapsed < 2.0, f"the search waited {elapsed:.2f}s of its 5 s for a dead instance"
    matches, summary, elapsed = await arena.search(timeout=5.0)
    assert_exact(matches, summary, hostile=1, unreachable=1)
    assert elapsed < 1.0
    arena.assert_honest_untouched()


async def test_a_frozen_then_killed_aiida_process(arena: Arena, tmp_path: Path) -> None:
    """A real aiida-stub process: SIGSTOP (no FIN, no RST: a hung host) and later SIGKILL mid-search."""
    stub = await asyncio.to_thread(
        procs.start,
        "aiida-frozen",
        [
            "aiida_stub",
            "--listen",
            "127.0.0.1:0",
            "--marketplace",
            arena.address,
            "--state-dir",
            str(tmp_path / "frozen"),
            "--profile",
            str(PROFILES / "vienna-p1.toml"),
            "--instance-id",
            "frozen-box",
            "--pairing-code",
            "FROZEN-2026",
        ],
        tmp_path,
    )
    pid = stub.popen.pid
    try:
        await claim_when_registered(arena.owner, "frozen-box", "FROZEN-2026")
        await arena.until_linked("frozen-box")
        with_stub = EXPECTED | {"frozen-box"}
        matches, summary, _ = await arena.search(timeout=3.0)
        assert_exact(matches, summary, hostile=1, matched=with_stub)

        os.kill(pid, signal.SIGSTOP)
        matches, summary, elapsed = await arena.search(timeout=0.6)
        assert_exact(matches, summary, hostile=1, timed_out=1)
        assert elapsed < 0.6 + 0.4
        os.kill(pid, signal.SIGCONT)  # it wakes up and answers the old query: too late, ignored
        matches, summary, _ = await arena.search(timeout=3.0)
        assert_exact(matches, summary, hostile=1, matched=with_stub)

        os.kill(pid, signal.SIGSTOP)
        search = asyncio.create_task(arena.search(timeout=5.0))
        await asyncio.sleep(0.3)
        stub.popen.kill()  # the kernel resets its connections
        matches, summary, elapsed = await asyncio.wait_for(search, 10)
        assert_exact(matches, summary, hostile=1, unreachable=1)
        assert elapsed < 2.5, f"the search waited {elapsed:.2f}s of its 5 s for a killed process"
        arena.assert_honest_untouched()
    finally:
        if stub.popen.poll() is None:
            os.kill(pid, signal.SIGCONT)
        stub.kill()


# --- 4. graceful shutdown under load ---


@dataclass
class Load:
    """Work in flight at one marketplace: unary calls that take real work, and open streams."""

    unary: list[asyncio.Task[tuple[float, grpc.StatusCode]]]  # when each call ended, and how
    search: asyncio.Task[tuple[list[str], data_request_pb2.SearchSummary, float]]
    health: Any  # grpc.health.v1 Health.Watch
    consent: Any  # the owner's ConsentService.Connect


async def _ended(call: Any) -> tuple[float, grpc.StatusCode]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return time.monotonic(), err.code()
    return time.monotonic(), grpc.StatusCode.OK


async def start_load(arena: Arena, calls: int = 24) -> Load:
    """`calls` account creations and `calls` logins (argon2: slow on purpose, so they queue up), a
    search of 2 s that waits for a silent instance, a health watch and a customer's consent stream."""
    identity = arena.owner.identity
    assert arena.owner.account is not None
    login = identity_pb2.CreateTokenRequest(email=arena.owner.account.email, password=PASSWORD)
    unary = []
    for _ in range(calls):
        create = identity_pb2.CreateAccountRequest(
            email=f"load-{secrets.token_hex(6)}@example.org",
            password=PASSWORD,
            display_name="Load",
            role=identity_pb2.ROLE_CUSTOMER,
        )
        unary.append(asyncio.create_task(_ended(identity.CreateAccount(create))))
        unary.append(asyncio.create_task(_ended(identity.CreateToken(login))))
    health = health_of(arena.channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
    consent = consent_of(arena.owner).Connect(metadata=arena.owner.metadata)
    opening: Any = None
    while opening is None or not opening.HasField("ready"):
        opening = await consent.read()
    search = asyncio.create_task(arena.search(timeout=2.0))
    await asyncio.sleep(0.3)  # every call is on the wire
    return Load(unary, search, health, consent)


async def assert_drained(
    load: Load, signalled: float, grace: float, address: str
) -> list[tuple[float, grpc.StatusCode]]:
    """Health said NOT_SERVING, new calls are refused, the search and the streams ended properly.
    Returns how each unary call ended (when, and its code)."""
    update = await asyncio.wait_for(load.health.read(), 2.0)
    assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING, update
    async with grpc.aio.insecure_channel(address) as fresh:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await identity_pb2_grpc.IdentityServiceStub(fresh).CreateToken(
                identity_pb2.CreateTokenRequest(email="late@example.org", password=PASSWORD), timeout=2.0
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    ended = await asyncio.wait_for(asyncio.gather(*load.unary), grace + 2)
    assert any(t > signalled and code == grpc.StatusCode.OK for t, code in ended), (
        "no call finished after the signal: nothing was in flight, the test proves nothing"
    )
    matches, summary, _ = await asyncio.wait_for(load.search, grace + 2)
    assert_exact(matches, summary, hostile=1, timed_out=1)  # ran to its end: matches, summary and all
    # A long-lived stream is ended by the server (not left hanging) by the end of the grace period.
    stream_end = None
    try:
        async with asyncio.timeout(grace + 2):
            while await load.consent.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as err:
        stream_end = err.code()
    assert stream_end in (None, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), stream_end
    return ended


def count_started(app: Marketplace) -> Counter[str]:
    """Counts the identity calls the server has begun to handle (the real service does the work)."""
    identity = app.components["identity"]
    started: Counter[str] = Counter()
    for name in ("create_account", "login"):
        real = getattr(identity, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            started[_name] += 1
            return await _real(*args)

        setattr(identity, name, counted)
    return started


async def test_stop_under_load_drains_in_flight_calls_and_refuses_new_ones(tmp_path: Path) -> None:
    """The in-process path: Marketplace.stop(grace) with calls and streams in flight."""
    grace = 3.0
    honest = await HostileAiida({**{i: Script(m) for i, m in HONEST.items()}, "silent-box": Silent()}).start()
    market = await start_marketplace(arena_config(tmp_path, grace_period=grace))
    try:
        arena = await build_arena(market.channel, market.address, market.app, honest)
        await arena.add(honest, "silent-box")
        started = count_started(market.app)
        load = await start_load(arena)

        # Client and server share this loop: under a busy machine the server may not have picked up
        # any call 0.3 s in. Stop only once calls are really running inside the server.
        async def in_flight() -> bool:
            return started.total() - sum(task.done() for task in load.unary) >= 2

        await eventually(in_flight, 10, "calls running inside the server", step=0.005)
        signalled = time.monotonic()
        stopping = asyncio.create_task(market.app.stop())
        ended = await assert_drained(load, signalled, grace, market.address)
        await asyncio.wait_for(stopping, grace + 5)
        assert time.monotonic() - signalled < grace + 5
        # Client and server share this event loop, so a call may still wait in gRPC's queue, sent but not
        # yet handed to the server, when the stop begins; gRPC refuses those. Every call the server had
        # begun must have finished.
        codes = Counter(code for _, code in ended)
        assert codes[grpc.StatusCode.OK] == started.total(), (codes, started)
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}, (
            codes
        )
    finally:
        await market.channel.close()
        await market.app.stop(0)
        await honest.stop()


@pytest.mark.slow
async def test_sigterm_under_load_drains_and_exits_zero(tmp_path: Path) -> None:
    """The real process: SIGTERM with calls and streams in flight; exit 0 within grace + a few seconds."""
    grace = 4.0
    honest = await HostileAiida({**{i: Script(m) for i, m in HONEST.items()}, "silent-box": Silent()}).start()
    flags = ("--grace-period", str(grace), "--claim-rate", "1000", "--search-rate", "1000")
    mp = await asyncio.to_thread(procs.start_marketplace, tmp_path / "mp", tmp_path, *flags)
    channel = grpc.aio.insecure_channel(mp.address)
    try:
        arena = await build_arena(channel, mp.address, None, honest)
        await arena.add(honest, "silent-box")
        load = await start_load(arena)
        signalled = time.monotonic()
        mp.popen.send_signal(signal.SIGTERM)
        ended = await assert_drained(load, signalled, grace, mp.address)
        failed = [(round(t - signalled, 2), code.name) for t, code in ended if code != grpc.StatusCode.OK]
        assert not failed, f"in-flight calls failed (seconds after SIGTERM, code): {failed}"
        code = await asyncio.to_thread(mp.popen.wait, grace + 5)
        exited = time.monotonic() - signalled
        assert code == 0, f"exit code {code}: {mp.lines[-10:]}"
        assert exited < grace + 5, f"exited {exited:.1f}s after SIGTERM"
    finally:
        await channel.close()
        mp.kill()
        await honest.stop()


# --- 3. the database goes away under a running marketplace, and comes back ---


def _postgres_cluster() -> tuple[str, str] | None:
    """(version, name) of the local cluster on port 5432, if pg_lsclusters knows one."""
    if shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
        return None
    listing = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "5432":
            return fields[0], fields[1]
    return None


def _pg_ctl(cluster: tuple[str, str], action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, action],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def _until_postgres(up: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while postgres_reachable() != up:
        assert time.monotonic() < deadline, f"PostgreSQL never became {'reachable' if up else 'unreachable'}"
        await asyncio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_database_outage_is_unavailable_and_the_same_process_recovers(tmp_path: Path) -> None:
    cluster = _postgres_cluster()
    if not postgres_reachable() or cluster is None:
        pytest.skip("needs the local PostgreSQL cluster on 127.0.0.1:5432 and pg_ctlcluster to stop it")
    schema = f"t_{secrets.token_hex(8)}"
    try:
        await _postgres_execute(f"CREATE SCHEMA {schema}")
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is not usable: {type(exc).__name__}: {exc}")
    honest = await HostileAiida({i: Script(m) for i, m in HONEST.items()}).start()
    market = await start_marketplace(
        arena_config(tmp_path, database_url=POSTGRES_URL, database_schema=schema)
    )
    try:
        arena = await build_arena(market.channel, market.address, market.app, honest)
        owner, ep = arena.owner, arena.ep
        assert owner.account is not None

        def calls() -> dict[str, Any]:
            """Calls that each need the database (authentication alone reads the account)."""
            return {
                "CreateToken": identity_of(owner).CreateToken(
                    identity_pb2.CreateTokenRequest(email=owner.account.email, password=PASSWORD)  # type: ignore[union-attr]
                ),
                "GetCurrentAccount": identity_of(owner).GetCurrentAccount(
                    identity_pb2.GetCurrentAccountRequest(), metadata=owner.metadata
                ),
                "ListDataRequests": data_requests_of(ep).ListDataRequests(
                    data_request_pb2.ListDataRequestsRequest(), metadata=ep.metadata
                ),
                "CreateDataRequest": data_requests_of(ep).CreateDataRequest(
                    data_request_pb2.CreateDataRequestRequest(
                        data_request=data_request_pb2.DataRequest(
                            title="Outage", purpose="Test", data_need=NEED
                        )
                    ),
                    metadata=ep.metadata,
                ),
                "SearchInstances": arena.search(timeout=1.0),
            }

        health = health_of(market.channel)
        try:
            await asyncio.to_thread(_pg_ctl, cluster, "stop")
            await _until_postgres(up=False)
            await asyncio.sleep(2.5)  # past the authenticator's account cache
            for name, call in calls().items():
                started = time.monotonic()
                err = await expect_error(call, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
                took = time.monotonic() - started
                assert took < 6.0, f"{name} took {took:.1f}s to say the database is unavailable"
                details = err.details() or ""
                assert "asyncpg" not in details and "sqlalchemy" not in details.lower(), details
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await asyncio.to_thread(_pg_ctl, cluster, "start")
        await _until_postgres(up=True)
        # The same process recovers: no restart, the pool replaces its dead connections.
        deadline = time.monotonic() + 20
        while True:
            pending = calls()
            results = await asyncio.gather(*pending.values(), return_exceptions=True)
            failures = {n: r for n, r in zip(pending, results, strict=True) if isinstance(r, BaseException)}
            if not failures:
                break
            assert time.monotonic() < deadline, f"still failing after the database came back: {failures}"
            await asyncio.sleep(0.5)
        # The background workers survived the outage too: an approval reaches the AIIDA.
        matches, summary, _ = await arena.search(timeout=3.0)
        assert_exact(matches, summary, hostile=0)
        [permission] = (
            await access_of(ep).RequestAccess(
                access_pb2.RequestAccessRequest(
                    data_request=arena.data_request.name, instance_ids=["honest-match-1"], sink_uri=SINK_URI
                ),
                metadata=ep.metadata,
            )
        ).permissions
        await consent_of(owner).DecideAccess(
            consent_pb2.DecideAccessRequest(permission=permission.name, approve=True), metadata=owner.metadata
        )
        permission_id = permission.name.removeprefix("permissions/")
        await honest.until(lambda: permission_id in honest.configured, 10, "configured after the outage")
    finally:
        if not postgres_reachable() and cluster is not None:
            await asyncio.to_thread(_pg_ctl, cluster, "start")
        await market.channel.close()
        await market.app.stop(0.2)
        await honest.stop()
        await _postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# --- 2. the marketplace is SIGKILLed while customers approve ---


@pytest.mark.slow
@pytest.mark.e2e
async def test_a_marketplace_killed_while_customers_approve_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "mp"
    started: list[procs.Proc] = []

    def marketplace(port: int) -> procs.Proc:
        flags = ("--claim-rate", "1000", "--grace-period", "1")
        return procs.start_marketplace(data_dir, tmp_path, *flags, listen=f"127.0.0.1:{port}")

    mp = await asyncio.to_thread(marketplace, 0)
    started.append(mp)
    client = MarketplaceClient(mp.address)
    try:
        sink = await asyncio.to_thread(procs.start_sink, mp.address, tmp_path / "sink", tmp_path, name="sink")
        started.append(sink)
        stubs = {}
        for who, profile in (("alice", "vienna-p1.toml"), ("bernd", "graz-gas.toml")):
            flags = (
                "--instance-id",
                f"aiida-{who}",
                "--pairing-code",
                f"{who.upper()}-2026",
                "--time-scale",
                "60",
            )
            stubs[who] = await asyncio.to_thread(
                procs.start_aiida,
                mp.address,
                tmp_path / who,
                PROFILES / profile,
                tmp_path,
                *flags,
                name=f"aiida-{who}",
            )
            started.append(stubs[who])
        ep = await client.sign_up(ROLE_ELIGIBLE_PARTY, "ep@faults.example", PASSWORD, "Fault Research")
        customers = {}
        for who in stubs:
            customers[f"aiida-{who}"] = session = await client.sign_up(
                ROLE_CUSTOMER, f"{who}@faults.example", PASSWORD, who.title()
            )
            await session.claim(f"aiida-{who}", f"{who.upper()}-2026", wait=10)
        for session in customers.values():
            await eventually(lambda s=session: _all_connected(s), 10, "the AIIDAs connected")

        # Three data requests, each matched by both AIIDAs: six permissions, all pending.
        need = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400, ["AT"])
        permissions: list[access_pb2.Permission] = []
        for n in range(3):
            request = await ep.create_data_request(f"Study {n}", "Resilience", need)
            matches, _ = await ep.search(request.name, timeout=3)
            assert sorted(matches) == ["aiida-alice", "aiida-bernd"]
            permissions += await ep.request_access(request.name, matches, f"grpc://{sink.address}")
        assert len(permissions) == 6

        # Every customer approves everything at once; the marketplace dies as soon as half the answers
        # are back: the other decisions are anywhere between not received and committed, and the
        # configure calls of the committed ones anywhere between not sent and acknowledged.
        async def approve(p: access_pb2.Permission) -> access_pb2.Permission:
            return await customers[p.instance_id].decide(p.name, True)

        decisions = [asyncio.create_task(approve(p)) for p in permissions]
        for answered, _ in enumerate(asyncio.as_completed(decisions), 1):
            await _
            if answered == len(decisions) // 2:
                break
        mp.popen.send_signal(signal.SIGKILL)
        outcomes = await asyncio.gather(*decisions, return_exceptions=True)
        accepted = {
            p.name: o for p, o in zip(permissions, outcomes, strict=True) if not isinstance(o, BaseException)
        }
        assert accepted, "no decision came back before the kill"
        assert all(o.state == Permission.STATE_ACCEPTED for o in accepted.values())
        await asyncio.to_thread(mp.popen.wait, 10)
        assert mp.popen.returncode == -signal.SIGKILL

        # Same port, same data directory; the AIIDAs and the sink keep running.
        mp = await asyncio.to_thread(marketplace, mp.port)
        started.append(mp)
        for p in permissions:
            state = (await ep.get_permission(p.name)).state
            if p.name in accepted:  # an answered decision survived the kill
                assert state in (Permission.STATE_ACCEPTED, Permission.STATE_ACTIVE), (p.name, state)
        # The customers' apps retry what got no answer: applied once, or applied now.
        for p, outcome in zip(permissions, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                retried = await _approve_again(customers[p.instance_id], p.name)
                if isinstance(retried, grpc.aio.AioRpcError):  # it was decided before the kill
                    info = error_info(retried)
                    assert retried.code() == grpc.StatusCode.FAILED_PRECONDITION, retried
                    assert info is not None and info.reason == "PERMISSION_ALREADY_DECIDED", info
                else:
                    assert retried.state == Permission.STATE_ACCEPTED

        async def all_active() -> bool:
            states = [(await ep.get_permission(p.name)).state for p in permissions]
            return all(s == Permission.STATE_ACTIVE for s in states)

        await eventually(all_active, 20, "every permission active")
        # None lost, none duplicated: each data request still has its two permissions, and an answered
        # decision kept its time (it was not decided a second time).
        for p in permissions:
            now = await ep.get_permission(p.name)
            if p.name in accepted:
                assert now.decide_time == accepted[p.name].decide_time
        listed = []
        for data_request in {p.data_request for p in permissions}:
            page = await ep.access.ListPermissions(
                access_pb2.ListPermissionsRequest(data_request=data_request, page_size=100),
                metadata=ep.metadata,
            )
            assert sorted(x.instance_id for x in page.permissions) == ["aiida-alice", "aiida-bernd"]
            listed += [x.name for x in page.permissions]
        assert sorted(listed) == sorted(p.name for p in permissions)

        # Each AIIDA holds each of its permissions exactly once, configured exactly once.
        issuer = TokenIssuer(SigningKey.load_or_create(data_dir / "signing-key.pem"))
        for who, stub in stubs.items():
            instance = f"aiida-{who}"
            mine = sorted(
                p.name.removeprefix("permissions/") for p in permissions if p.instance_id == instance
            )
            token, _ = issuer.issue(f"instances/{instance}", AUDIENCE_AIIDA, 60)
            async with grpc.aio.insecure_channel(stub.address) as channel:
                held = await aiida_pb2_grpc.AiidaServiceStub(channel).ListDataAccesses(
                    aiida_pb2.ListDataAccessesRequest(),
                    metadata=(("authorization", f"Bearer {token}"), ("aiida-instance-id", instance)),
                )
            assert sorted(a.permission_id for a in held.data_accesses) == mine
            assert {a.state for a in held.data_accesses} == {DataAccess.STATE_ACTIVE}
            log = (tmp_path / f"aiida-{who}.log").read_text()
            for permission_id in mine:
                configured = [
                    line
                    for line in log.splitlines()
                    if "event=data_access_state" in line
                    and f"permission={permission_id} " in line
                    and "state=STATE_ACTIVE" in line
                ]
                mentions = [line for line in log.splitlines() if permission_id in line]
                assert len(configured) == 1, (
                    f"{instance} configured {permission_id} {len(configured)} times: {mentions}"
                )

        # Readings reach the sink, at least once and stored once per (permission, tag, time).
        for p in permissions:
            permission_id = p.name.removeprefix("permissions/")

            async def readings(pid: str = permission_id) -> list[Any]:
                return await list_readings(sink.address, pid, ep.token.access_token)

            got = await eventually(readings, 15, f"readings of {permission_id}")
            keys = [(r.permission_id, r.data_tag, r.time.ToNanoseconds()) for r in got]
            assert len(keys) == len(set(keys)), f"duplicate readings for {permission_id}"
            assert {r.permission_id for r in got} == {permission_id}
            assert {r.data_tag for r in got} == {"1-0:1.8.0"}
        # Nothing is left to deliver.
        with sqlite3.connect(data_dir / "marketplace.db") as db:
            assert db.execute("SELECT count(*) FROM outbox WHERE done = 0").fetchone() == (0,)
    finally:
        await client.channel.close()
        for proc in reversed(started):
            proc.stop()


class RecordingSink(data_sink_pb2_grpc.DataSinkServiceServicer):
    """A data sink that accepts every reading and counts them per permission."""

    def __init__(self) -> None:
        self.readings: Counter[str] = Counter()

    async def Publish(self, request_iterator: Any, context: Any) -> data_sink_pb2.PublishResponse:  # type: ignore[override]
        accepted = 0
        async for request in request_iterator:
            self.readings[request.reading.permission_id] += 1
            accepted += 1
        return data_sink_pb2.PublishResponse(accepted=accepted)

    async def ListReadings(self, request: Any, context: Any) -> data_sink_pb2.ListReadingsResponse:  # type: ignore[override]
        return data_sink_pb2.ListReadingsResponse()


async def test_a_configure_cut_off_mid_call_still_starts_the_data_flow(tmp_path: Path) -> None:
    """The marketplace dies while an AIIDA handles its ConfigureDataAccess; the call is cancelled. The
    access must not end up stored as ACTIVE yet never streamed (the redelivery finds it and returns it)."""
    market = await start_marketplace(test_config(tmp_path))
    recorder = RecordingSink()
    sink = grpc.aio.server()
    data_sink_pb2_grpc.add_DataSinkServiceServicer_to_server(recorder, sink)
    sink_port = sink.add_insecure_port("127.0.0.1:0")
    await sink.start()
    aiida = await start_aiida(market, tmp_path, "cut-box", PROFILES / "vienna-p1.toml", time_scale=60.0)
    try:
        now = time.time()

        def configure(permission_id: str) -> aiida_pb2.ConfigureDataAccessRequest:
            access = aiida_pb2.DataAccess(
                permission_id=permission_id,
                data_need=data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 3600, ["AT"]),
                sink_uri=f"grpc://127.0.0.1:{sink_port}",
                sink_token="recorded-not-checked",
            )
            access.start_time.FromSeconds(int(now))
            access.end_time.FromSeconds(int(now) + 3600)
            return aiida_pb2.ConfigureDataAccessRequest(data_access=access)

        # Deterministic: the handler is cancelled at its first wait, as gRPC cancels it when the peer dies.
        instance = aiida.app.instances["cut-box"]
        handler = asyncio.create_task(instance.configure_access(configure("cut-direct")))
        await asyncio.sleep(0)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        # Over gRPC: calls cancelled by the caller after a range of delays, some mid-way.
        token, _ = market.app.issuer.issue("instances/cut-box", AUDIENCE_AIIDA, 60)
        metadata = (("authorization", f"Bearer {token}"), ("aiida-instance-id", "cut-box"))
        delays = [0.0, 0.001, 0.002, 0.003, 0.005, 0.008, 0.013, 0.021]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{aiida.port}") as channel:
            stub = aiida_pb2_grpc.AiidaServiceStub(channel)
            for n, delay in enumerate(delays):
                call = stub.ConfigureDataAccess(configure(f"cut-rpc-{n}"), metadata=metadata)
                await asyncio.sleep(delay)
                call.cancel()
            # The marketplace comes back and redelivers every configure: each is ACTIVE and streams.
            ids = ["cut-direct", *(f"cut-rpc-{n}" for n in range(len(delays)))]
            for permission_id in ids:
                access = await stub.ConfigureDataAccess(configure(permission_id), metadata=metadata)
                assert access.state == DataAccess.STATE_ACTIVE, (permission_id, access.state)

        async def all_streaming() -> bool:
            return all(recorder.readings[i] > 0 for i in ids)

        await eventually(all_streaming, 10, f"readings of every access: {dict(recorder.readings)}")
    finally:
        await aiida.app.stop(0)
        await sink.stop(0)
        await market.channel.close()
        await market.app.stop(0)


async def _approve_again(customer: Session, name: str) -> access_pb2.Permission | grpc.aio.AioRpcError:
    try:
        return await customer.decide(name, True)
    except grpc.aio.AioRpcError as err:
        return err


async def _all_connected(session: Session) -> bool:
    return all(i.connected for i in await session.list_instances())
