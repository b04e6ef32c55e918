"""Three real replicas (in-process create_server) on one PostgreSQL schema and one NATS server.

Skipped with a reason when PostgreSQL (127.0.0.1:5432) or NATS (127.0.0.1:4222) is unreachable.
"""

from __future__ import annotations

import asyncio
import csv
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from aiida_stub.config import Config as AiidaConfig
from aiida_stub.matcher import matches
from aiida_stub.server import create_server as create_fleet
from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, instance_pb2
from eddie_client.client import Session
from marketplace_server.cluster.leases import BUCKETS
from marketplace_server.config import Config
from tests.cluster.test_events import nats_reachable
from tests.support.access import SECRET, SINK_URI, data_need, read_until
from tests.support.aiida_double import AiidaDouble, RunningAiida, start_aiida
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config
from tests.support.postgres import POSTGRES_URL, postgres_execute, postgres_reachable

pytestmark = [pytest.mark.postgres, pytest.mark.nats]
NATS_URL = "nats://127.0.0.1:4222"
PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"
FLEET = 60


def replica_config(tmp_path: Path, schema: str, prefix: str, index: int) -> Config:
    return test_config(
        tmp_path,
        # A data dir each: the signing keys live in the database, shared by the replicas.
        data_dir=tmp_path / f"replica-{index}",
        database_url=POSTGRES_URL,
        database_schema=schema,
        nats_url=NATS_URL,
        cluster_name=prefix,
        replica_id=f"r{index}",
        lease_seconds=8.0,
        renew_seconds=1.0,
        claim_attempts_per_minute=100_000,
        search_rate_per_minute=10_000,
        reconnect_max_backoff=0.5,
    )


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[list[RunningMarketplace]]:
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
    if not nats_reachable():
        pytest.skip("NATS is not reachable on 127.0.0.1:4222")
    schema = f"t_{secrets.token_hex(8)}"
    try:
        await postgres_execute(f"CREATE SCHEMA {schema}")
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is not usable: {type(exc).__name__}: {exc}")
    prefix = f"test{secrets.token_hex(6)}"  # this run's own subjects on the shared server
    running: list[RunningMarketplace] = []
    try:
        for index in range(3):
            running.append(await start_marketplace(replica_config(tmp_path, schema, prefix, index)))
        await settled(running)
        yield running
    finally:
        for replica in running:
            await replica.channel.close()
            await replica.app.stop(0.2)
        await postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def settled(replicas: list[RunningMarketplace], timeout: float = 15.0) -> None:
    """Until every bucket has exactly one owner and the replicas hold even shares."""
    end = time.monotonic() + timeout
    while True:
        held = [set(r.app.cluster.leases.held) for r in replicas if r.app.cluster is not None]
        owners = Counter(b for buckets in held for b in buckets)
        share = -(-BUCKETS // len(replicas))
        if len(owners) == BUCKETS and set(owners.values()) == {1} and all(len(h) <= share for h in held):
            return
        assert time.monotonic() < end, f"buckets never settled: {[len(h) for h in held]}"
        await asyncio.sleep(0.1)


def as_client(replica: RunningMarketplace, client: Session) -> Session:
    """The same account (same token) talking to another replica."""
    return replace(client, channel=replica.channel)


async def search(ep: Session, name: str, timeout: float = 5.0) -> tuple[list[str], Any]:
    matched: list[str] = []
    summary = None
    request = data_request_pb2.SearchInstancesRequest(
        data_request=name, timeout=Duration(seconds=int(timeout))
    )
    async for response in ep.data_requests.SearchInstances(request, metadata=ep.metadata):
        if response.HasField("matches"):
            matched.extend(response.matches.instance_ids)
        else:
            assert summary is None, "more than one summary"
            summary = response.summary
    assert summary is not None, "no summary"
    return matched, summary


def balanced(summary: Any) -> bool:
    rest = summary.matched + summary.not_matched + summary.unreachable + summary.timed_out
    return bool(summary.queried == rest)


async def create_request(ep: Session, **need: Any) -> data_request_pb2.DataRequest:
    return await ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(
                title="Study", purpose="Research", data_need=data_need(**need)
            )
        ),
        metadata=ep.metadata,
    )


async def test_a_search_on_any_replica_finds_exactly_the_matching_instances_of_a_fleet(
    replicas: list[RunningMarketplace], tmp_path: Path
) -> None:
    first = replicas[0]
    fleet, _ = await create_fleet(
        AiidaConfig(
            marketplace=first.address,
            state_dir=tmp_path / "fleet",
            profiles=(PROFILES,),
            fleet=FLEET,
            id_prefix="c",
            log_level="warning",
        )
    )
    await fleet.start()
    try:
        await fleet.wait_registered()
        rows = list(csv.DictReader((tmp_path / "fleet" / "fleet.csv").open()))
        owner = await first.customer()
        for i, row in enumerate(rows):  # claims spread over the replicas: non-owners forward them
            via = as_client(replicas[i % 3], owner)
            await via.instances.ClaimInstance(
                instance_pb2.ClaimInstanceRequest(
                    instance_id=row["instance_id"], pairing_code=row["pairing_code"]
                ),
                metadata=via.metadata,
            )
        ep = await first.eligible_party()
        request = await create_request(ep)
        need = request.data_need
        expected = sorted(
            i for i, instance in fleet.instances.items() if matches(instance.profile, need, time.time())
        )
        assert 0 < len(expected) < FLEET, "the profiles should split the fleet"

        end = time.monotonic() + 30
        while True:  # until every stream is up (each on its owner)
            links = [r.app.manager.links for r in replicas]
            up = sum(link.connected for held in links for link in held.values())
            if up == FLEET:
                break
            assert time.monotonic() < end, f"only {up} of {FLEET} streams up"
            await asyncio.sleep(0.2)
        held = Counter(i for r in replicas for i in r.app.manager.links)
        assert len(held) == FLEET and set(held.values()) == {1}, (
            "each instance's stream on exactly one replica"
        )
        assert all(r.app.manager.links for r in replicas), "every replica holds some streams"

        for replica in replicas:
            matched, summary = await search(as_client(replica, ep), request.name)
            assert sorted(matched) == expected
            assert len(matched) == len(set(matched)), "an id twice"
            assert summary.queried == FLEET and balanced(summary)
            assert (summary.matched, summary.not_matched) == (len(expected), FLEET - len(expected))
            assert summary.unreachable == 0 and summary.timed_out == 0
    finally:
        await fleet.stop(0)


async def claimed_on_double(
    replicas: list[RunningMarketplace], aiida: RunningAiida, customer: Session, instance_id: str
) -> None:
    code = f"CODE-{instance_id}"
    aiida.double.matches[instance_id] = True
    await (
        replicas[0]
        .client()
        .instances.RegisterInstance(
            instance_pb2.RegisterInstanceRequest(
                instance_id=instance_id, address=aiida.address, instance_secret=SECRET, pairing_code=code
            )
        )
    )
    await customer.instances.ClaimInstance(
        instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code),
        metadata=customer.metadata,
    )
    end = time.monotonic() + 10
    while not any(r.app.manager.is_connected(instance_id) for r in replicas):
        assert time.monotonic() < end, f"{instance_id} never linked"
        await asyncio.sleep(0.02)


async def test_a_request_through_a_reaches_a_customer_on_b_and_her_decision_through_b_an_ep_watching_on_c(
    replicas: list[RunningMarketplace],
) -> None:
    a, b, c = replicas
    double = await start_aiida(AiidaDouble())
    double.double.configure_state = aiida_pb2.DataAccess.STATE_ACTIVE  # like the reference AIIDA
    try:
        customer = await a.customer()
        await claimed_on_double(replicas, double, customer, f"x-{secrets.token_hex(4)}")
        ep = await a.eligible_party()
        request = await create_request(ep)
        matched, _ = await search(ep, request.name)
        assert len(matched) == 1

        on_b = as_client(b, customer)
        queue: asyncio.Queue[consent_pb2.ConnectRequest | None] = asyncio.Queue()

        async def outgoing() -> AsyncIterator[consent_pb2.ConnectRequest]:
            while (message := await queue.get()) is not None:
                yield message

        consent = on_b.consent.Connect(outgoing(), metadata=on_b.metadata)
        watch_on_c = as_client(c, ep)
        watch = watch_on_c.access.WatchPermissions(
            access_pb2.WatchPermissionsRequest(data_request=request.name), metadata=watch_on_c.metadata
        )
        try:
            await read_until(consent, lambda m: m.HasField("ready"))
            await asyncio.sleep(0.2)  # the watch on C is subscribed (its first read is the snapshot)
            [permission] = (
                await ep.access.RequestAccess(
                    access_pb2.RequestAccessRequest(
                        data_request=request.name, instance_ids=matched, sink_uri=SINK_URI
                    ),
                    metadata=ep.metadata,
                )
            ).permissions
            [shown] = (await read_until(consent, lambda m: m.HasField("access_request")))[-1:]
            assert shown.access_request.permission.name == permission.name

            await on_b.consent.DecideAccess(
                consent_pb2.DecideAccessRequest(permission=permission.name, approve=True),
                metadata=on_b.metadata,
            )
            seen = await read_until(
                watch,
                lambda m: (
                    m.permission.name == permission.name
                    and m.permission.state
                    in (access_pb2.Permission.STATE_ACCEPTED, access_pb2.Permission.STATE_ACTIVE)
                ),
            )
            assert seen[-1].permission.name == permission.name
            # The owner of the instance delivered the configure call (outbox): the access goes ACTIVE.
            await read_until(
                watch,
                lambda m: (
                    m.permission.name == permission.name
                    and m.permission.state == access_pb2.Permission.STATE_ACTIVE
                ),
                timeout=15,
            )
        finally:
            consent.cancel()
            watch.cancel()
            queue.put_nowait(None)
    finally:
        await double.stop()


async def test_start_up_fails_in_one_line_when_nats_is_unreachable(tmp_path: Path) -> None:
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
    config = test_config(tmp_path, database_url=POSTGRES_URL, nats_url="nats://127.0.0.1:1")
    with pytest.raises(OSError, match=r"NATS at nats://127.0.0.1:1 is unreachable .* --nats-url"):
        await start_marketplace(config)


def test_cluster_mode_needs_postgresql() -> None:
    problems = Config(nats_url=NATS_URL).problems()
    assert "--nats-url (cluster mode) needs a PostgreSQL --database-url" in problems
    assert Config(nats_url=NATS_URL, database_url=POSTGRES_URL).problems() == []
    assert Config().clustered is False
