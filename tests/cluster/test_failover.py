"""SIGKILL or SIGTERM one of three replica processes while searches run every 0.5 s (PostgreSQL + NATS).

Every summary balances and names no id twice while the replica is dead; its buckets
are owned by the two others well before its leases could expire (a search after the
kill gets "no responders" from NATS for it, and the coordinator expires its leases;
the first one, unless it still reached the dying process and waits its deadline);
within 15 s of the kill searches are exact again (its instances taken over); the
killed replica restarts and the rebalancing never double-counts. SIGTERM hands the
buckets over at once: searches are exact again long before a lease could expire, and a search the
stopping replica was serving still ends with a balanced summary.
"""

from __future__ import annotations

import asyncio
import csv
import os
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from aiida_stub.config import Config as AiidaConfig
from aiida_stub.server import create_server as create_fleet
from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import identity_pb2, instance_pb2, instance_pb2_grpc
from eddie_client.client import Session
from marketplace_server.cluster.leases import BUCKETS, LEASE_SECONDS, RENEW_SECONDS
from tests.cluster.test_events import nats_reachable
from tests.cluster.test_replicas import NATS_URL, PROFILES, balanced, create_request, search
from tests.support.access import SECRET
from tests.support.hostile_aiida import HostileAiida, Script, Stream, reply
from tests.support.marketplace import signup
from tests.support.postgres import POSTGRES_URL, postgres_dsn, postgres_execute, postgres_reachable

pytestmark = [pytest.mark.postgres, pytest.mark.nats, pytest.mark.slow, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
FLEET = 60
TAKEOVER_SECONDS = 15.0


@dataclass
class Replica:
    """One `marketplace-server` process of the cluster."""

    index: int
    args: list[str]
    log: Path
    process: asyncio.subprocess.Process | None = None
    channel: grpc.aio.Channel | None = None
    address: str = ""

    async def start(self) -> None:
        with self.log.open("ab") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "marketplace_server", *self.args,
                cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=dict(os.environ),
            )  # fmt: skip
        assert self.process.stdout is not None
        line = (await asyncio.wait_for(self.process.stdout.readline(), 60)).decode().strip()
        assert line.startswith("listening on "), f"replica {self.index}: {line!r} (see {self.log})"
        self.address = line.removeprefix("listening on ")
        if self.channel is not None:
            await self.channel.close()
        self.channel = grpc.aio.insecure_channel(self.address)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.channel is not None:
            await self.channel.close()


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[list[Replica]]:
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
    if not nats_reachable():
        pytest.skip("NATS is not reachable on 127.0.0.1:4222")
    schema = f"t_{secrets.token_hex(8)}"
    await postgres_execute(f"CREATE SCHEMA {schema}")
    prefix = f"test{secrets.token_hex(6)}"
    common = [
        "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "keys"),
        "--database-url", POSTGRES_URL, "--database-schema", schema,
        "--nats-url", NATS_URL, "--cluster-name", prefix,
        "--claim-rate", "100000", "--search-rate", "100000", "--log-level", "warning",
    ]  # fmt: skip
    replicas = [
        Replica(i, [*common, "--replica-id", f"p{i}"], tmp_path / f"replica-{i}.log") for i in range(3)
    ]
    try:
        for replica in replicas:
            await replica.start()
        yield replicas
    finally:
        for replica in replicas:
            await replica.stop()
        await postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def on(replica: Replica, client: Session) -> Session:
    assert replica.channel is not None
    return replace(client, channel=replica.channel)


class Lagging(Script):
    """An honest device that answers after `delay` seconds (0 unless a test wants a search held open)."""

    delay = 0.0

    async def query(self, stream: Stream, query: aiida_pb2.SearchQuery) -> None:
        await asyncio.sleep(self.delay)
        await stream.send(reply(query.query_id, True))


@dataclass
class Scenario:
    """A fleet (plus one lagging device) claimed through replica 0, an EP's open data request."""

    processes: list[Replica]
    ep: Session
    request_name: str
    lagging: Lagging
    instances: int
    expected: list[str] = field(default_factory=list)
    inexact: int = 0  # searches with instances unreachable or timed out in the last until_exact
    last_inexact: Any = None

    async def one_search(self, replica: Replica, timeout: float = 2.0) -> tuple[list[str], Any]:
        matched, summary = await search(on(replica, self.ep), self.request_name, timeout=timeout)
        assert len(matched) == len(set(matched)), "an id twice"
        assert balanced(summary), summary
        assert summary.queried == self.instances, summary
        assert summary.matched >= len(matched), summary  # ids lost in transit still count
        if self.expected:  # nothing matched that does not match, nothing counted twice
            assert set(matched) <= set(self.expected), sorted(set(matched) - set(self.expected))
            assert summary.matched <= len(self.expected), summary
        return matched, summary

    async def until_exact(self, replica: Replica, limit: float) -> tuple[float, list[str]]:
        started = time.monotonic()
        self.inexact = 0
        while True:
            matched, summary = await self.one_search(replica)
            if summary.unreachable == 0 and summary.timed_out == 0:
                assert summary.matched == len(matched), summary
                return time.monotonic() - started, sorted(matched)
            self.inexact += 1
            self.last_inexact = summary
            assert time.monotonic() - started < limit, f"not exact after {limit}s: {summary}"
            await asyncio.sleep(0.5)


@pytest.fixture
async def scenario(processes: list[Replica], tmp_path: Path) -> AsyncIterator[Scenario]:
    first = processes[0]
    assert first.channel is not None
    fleet, _ = await create_fleet(
        AiidaConfig(
            marketplace=first.address,
            state_dir=tmp_path / "fleet",
            profiles=(PROFILES,),
            fleet=FLEET,
            id_prefix="k",
            log_level="warning",
        )
    )
    lagging = Lagging()
    device = await HostileAiida({"lagging-box": lagging}).start()
    await fleet.start()
    try:
        await fleet.wait_registered()
        # Accounts through replica 0; their tokens verify at every replica.
        owner = await signup(first.channel, identity_pb2.ROLE_CUSTOMER)
        rows = csv.DictReader((tmp_path / "fleet" / "fleet.csv").open())
        codes = [(row["instance_id"], row["pairing_code"]) for row in rows]
        await instance_pb2_grpc.InstanceServiceStub(first.channel).RegisterInstance(
            instance_pb2.RegisterInstanceRequest(
                instance_id="lagging-box",
                address=device.address,
                instance_secret=SECRET,
                pairing_code="CODE-LAG",
            )
        )
        for instance_id, code in [*codes, ("lagging-box", "CODE-LAG")]:
            await owner.instances.ClaimInstance(
                instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code),
                metadata=owner.metadata,
            )
        ep = await signup(first.channel, identity_pb2.ROLE_ELIGIBLE_PARTY)
        request = await create_request(ep)
        world = Scenario(processes, ep, request.name, lagging, FLEET + 1)
        _, world.expected = await world.until_exact(processes[1], 60)
        assert "lagging-box" in world.expected and len(world.expected) > 1
        yield world
    finally:
        await fleet.stop(0)
        await device.stop()


async def lease_owners(processes: list[Replica]) -> Counter[str]:
    """Buckets per live owner, as the database has them."""
    schema = processes[0].args[processes[0].args.index("--database-schema") + 1]
    connection = await asyncpg.connect(postgres_dsn(), timeout=5)
    try:
        rows = await connection.fetch(
            f"SELECT owner FROM {schema}.bucket_leases WHERE owner IS NOT NULL AND expires_at > now()"
        )
    finally:
        await connection.close()
    return Counter(str(row[0]) for row in rows)


async def taken_over(processes: list[Replica], since: float, gone: str) -> float:
    """Seconds from `since` until the live replicas other than `gone` own every bucket (by the database)."""
    while True:
        owners = await lease_owners(processes)
        if sum(owners.values()) == BUCKETS and gone not in owners:
            return time.monotonic() - since
        await asyncio.sleep(0.02)


@pytest.mark.timeout(300)
async def test_sigkill_of_a_replica_during_searches_never_double_counts_and_its_instances_come_back(
    scenario: Scenario,
) -> None:
    processes = scenario.processes
    searcher = processes[1]  # searches go to a replica that survives
    processes[2].kill()
    killed_at = time.monotonic()
    takeover = asyncio.create_task(taken_over(processes, killed_at, "p2"))
    _, matched = await scenario.until_exact(searcher, TAKEOVER_SECONDS + 15)
    reach = time.monotonic() - killed_at
    assert matched == scenario.expected
    owned = await asyncio.wait_for(takeover, TAKEOVER_SECONDS)
    print(f"\nkill -9 -> every bucket owned by a live replica after {owned:.2f}s")
    print(f"kill -9 -> every instance reachable again after {reach:.1f}s ({scenario.inexact} inexact)")
    print(f"the last inexact one: {scenario.last_inexact}".replace("\n", " "))
    # "No responders" for p2 at a search after the kill: its leases were expired by a
    # coordinator, not left to run out (that takes LEASE_SECONDS - RENEW_SECONDS at the very least).
    expired = [r.index for r in processes[:2] if "leases_replica_expired" in r.log.read_text()]
    assert expired, "no survivor expired the dead replica's leases"
    assert owned < LEASE_SECONDS - RENEW_SECONDS, f"its buckets moved after {owned:.2f}s"
    assert reach <= TAKEOVER_SECONDS + 2.5, f"takeover took {reach:.1f}s"  # + one search's timeout

    await processes[2].start()  # rejoins: buckets move back to it, never counted twice
    rejoined_at = time.monotonic()
    end = rejoined_at + 20
    while time.monotonic() < end:
        for replica in processes:  # the rejoined replica coordinates searches too
            await scenario.one_search(replica)
        await asyncio.sleep(0.5)
    owners = await lease_owners(processes)
    assert owners.get("p2", 0) > 0, f"the restarted replica took no bucket back: {owners}"
    assert sum(owners.values()) == BUCKETS and max(owners.values()) <= -(-BUCKETS // 3), owners
    for replica in processes:
        _, matched = await scenario.until_exact(replica, 30)
        assert matched == scenario.expected


@pytest.mark.timeout(300)
async def test_sigterm_hands_the_buckets_over_at_once_and_the_stopping_replicas_search_still_ends(
    scenario: Scenario,
) -> None:
    processes = scenario.processes
    stopping, searcher = processes[2], processes[1]
    # A search served by the stopping replica, held open by the lagging device when SIGTERM arrives.
    scenario.lagging.delay = 1.5
    in_flight = asyncio.create_task(scenario.one_search(stopping, timeout=4.0))
    await asyncio.sleep(0.5)
    stopping.kill(signal.SIGTERM)
    stopped_at = time.monotonic()
    await asyncio.sleep(0)
    scenario.lagging.delay = 0.0

    takeover = asyncio.create_task(taken_over(processes, stopped_at, "p2"))
    _, matched = await scenario.until_exact(searcher, TAKEOVER_SECONDS + 15)
    reach = time.monotonic() - stopped_at
    assert matched == scenario.expected
    print(f"\nSIGTERM -> every bucket owned by a live replica after {await takeover:.2f}s")
    print(f"SIGTERM -> every instance reachable again after {reach:.2f}s ({scenario.inexact} inexact)")
    print(f"the last inexact one: {scenario.last_inexact}".replace("\n", " "))
    # Released and taken over, not expired: well under the 10 s lease.
    assert reach < LEASE_SECONDS, f"handover took {reach:.1f}s"

    _, summary = await in_flight  # balanced, queried = claimed, no id twice (one_search checks)
    print(f"the stopping replica's in-flight search: {summary}".replace("\n", " "))
    assert stopping.process is not None
    assert await asyncio.wait_for(stopping.process.wait(), 30) == 0
