"""SIGKILL one of three replica processes while searches run every 0.5 s (PostgreSQL + NATS).

Every summary balances and names no id twice while the replica is dead; within 15 s
of the kill searches are exact again (its instances taken over); the killed replica
restarts and the rebalancing never double-counts.
"""

from __future__ import annotations

import asyncio
import csv
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiida_stub.config import Config as AiidaConfig
from aiida_stub.server import create_server as create_fleet
from eddie.marketplace.v1 import identity_pb2, instance_pb2
from eddie_client.client import Session
from tests.cluster.test_events import nats_reachable
from tests.cluster.test_replicas import NATS_URL, PROFILES, balanced, create_request, search
from tests.support.marketplace import signup
from tests.support.postgres import POSTGRES_URL, postgres_execute, postgres_reachable

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

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

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


@pytest.mark.timeout(300)
async def test_sigkill_of_a_replica_during_searches_never_double_counts_and_its_instances_come_back(
    processes: list[Replica], tmp_path: Path
) -> None:
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
    await fleet.start()
    try:
        await fleet.wait_registered()
        # Accounts through replica 0; their tokens verify at every replica.
        owner = await signup(first.channel, identity_pb2.ROLE_CUSTOMER)
        for row in csv.DictReader((tmp_path / "fleet" / "fleet.csv").open()):
            await owner.instances.ClaimInstance(
                instance_pb2.ClaimInstanceRequest(
                    instance_id=row["instance_id"], pairing_code=row["pairing_code"]
                ),
                metadata=owner.metadata,
            )
        ep = await signup(first.channel, identity_pb2.ROLE_ELIGIBLE_PARTY)
        request = await create_request(ep)
        searcher = on(processes[1], ep)  # searches go to a replica that survives

        async def one_search() -> Any:
            matched, summary = await search(searcher, request.name, timeout=2.0)
            assert len(matched) == len(set(matched)), "an id twice"
            assert balanced(summary), summary
            assert summary.queried == FLEET, summary
            assert summary.matched >= len(matched), summary  # ids lost in transit still count
            return matched, summary

        def exact(summary: Any) -> bool:
            return bool(summary.unreachable == 0 and summary.timed_out == 0)

        async def until_exact(limit: float) -> tuple[float, list[str]]:
            started = time.monotonic()
            while True:
                matched, summary = await one_search()
                if exact(summary):
                    assert summary.matched == len(matched), summary
                    return time.monotonic() - started, sorted(matched)
                assert time.monotonic() - started < limit, f"not exact after {limit}s: {summary}"
                await asyncio.sleep(0.5)

        _, expected = await until_exact(60)
        assert expected, "the data request should match some of the fleet"

        processes[2].kill()
        killed_at = time.monotonic()
        _, matched = await until_exact(TAKEOVER_SECONDS + 15)
        reach = time.monotonic() - killed_at
        assert matched == expected
        print(f"\nkill -9 -> every instance reachable again after {reach:.1f}s")
        assert reach <= TAKEOVER_SECONDS + 2.5, f"takeover took {reach:.1f}s"  # + one search's timeout

        await processes[2].start()  # rejoins: buckets move back to it, never counted twice
        end = time.monotonic() + 20
        while time.monotonic() < end:
            await one_search()
            await asyncio.sleep(0.5)
        _, matched = await until_exact(30)
        assert matched == expected
    finally:
        await fleet.stop(0)
