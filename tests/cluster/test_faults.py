"""Faults between replicas (three in-process replicas on PostgreSQL + NATS): lost search replies fail
the search loudly; a lost event publish is repaired from the database while the stream stays open."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import access_pb2, consent_pb2
from marketplace_server.cluster.events import ClusterEventHub
from marketplace_server.cluster.leases import BUCKETS
from marketplace_server.db.models import BucketLeaseRow
from tests.cluster.test_replicas import as_client, claimed_on_double, create_request, search
from tests.support.access import SINK_URI
from tests.support.aiida_double import AiidaDouble, start_aiida
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

pytestmark = [pytest.mark.postgres, pytest.mark.nats]


async def test_a_search_whose_inbox_dropped_replies_fails_with_search_incomplete(
    replicas: list[RunningMarketplace],
) -> None:
    a, b, _ = replicas
    double = await start_aiida(AiidaDouble())
    try:
        customer = await a.customer()
        await claimed_on_double(replicas, double, customer, f"s-{secrets.token_hex(4)}")
        ep = await a.eligible_party()
        request = await create_request(ep)
        node = b.app.cluster
        assert node is not None
        matched, summary = await search(as_client(b, ep), request.name)
        assert len(matched) == 1 and summary.unreachable == 0 and summary.timed_out == 0

        # nats-py drops what would exceed a subscription's pending limit (a slow consumer) and reports
        # it; with a one-byte limit every reply to b's inbox is dropped.
        node.inbox_pending_bytes = 1
        await expect_error(
            search(as_client(b, ep), request.name), grpc.StatusCode.UNAVAILABLE, "SEARCH_INCOMPLETE"
        )
        assert node.searches_incomplete == 1
        assert not node._inboxes, "the failed search's inbox is forgotten"

        node.inbox_pending_bytes = 64 * 1024 * 1024
        matched, summary = await search(as_client(b, ep), request.name)
        assert len(matched) == 1 and summary.unreachable == 0 and summary.timed_out == 0
        assert node.searches_incomplete == 1
    finally:
        await double.stop()


async def test_a_replica_no_one_serves_on_nats_loses_its_buckets_at_the_next_search_not_at_expiry(
    replicas: list[RunningMarketplace],
) -> None:
    """C stops as a kill -9 looks to the others (no more lease rounds, no search subscription at the
    NATS server): a search through B gets "no responders" for C, counts C's instance unreachable
    without waiting for its deadline, and B expires C's leases: A and B own every bucket well
    before C's 8 s leases could run out, and the next searches find the instance again."""
    a, b, c = replicas
    node_a, node_b, node_c = (r.app.cluster for r in replicas)
    assert node_a is not None and node_b is not None and node_c is not None
    double = await start_aiida(AiidaDouble())
    try:
        customer = await a.customer()
        ids = (f"g-{secrets.token_hex(4)}" for _ in range(100_000))
        instance_id = next(i for i in ids if node_c.owns(i))  # C holds its stream
        await claimed_on_double(replicas, double, customer, instance_id)
        ep = await a.eligible_party()
        request = await create_request(ep)
        matched, summary = await search(as_client(b, ep), request.name)
        assert matched == [instance_id] and summary.unreachable == 0

        assert node_c.leases._task is not None
        node_c.leases._task.cancel()  # no renewal, no self-fencing: as if the process were gone
        await asyncio.gather(node_c.leases._task, return_exceptions=True)
        for subscription in node_c._subscriptions:
            if subscription.subject == f"{node_c.prefix}.search.{node_c.replica_id}":
                await subscription.unsubscribe()
        await node_c.nc.flush()
        dead_at = time.monotonic()

        matched, summary = await search(as_client(b, ep), request.name, timeout=5.0)
        elapsed = time.monotonic() - dead_at
        assert matched == [] and summary.queried == 1 and summary.unreachable == 1, summary
        assert elapsed < 2.0, f"the search waited {elapsed:.2f}s for an owner NATS said no one serves"

        def moved() -> bool:
            held = [set(node_a.leases.held), set(node_b.leases.held)]
            return len(held[0] | held[1]) == BUCKETS and not held[0] & held[1]

        await until(moved, 5.0, "A and B own every bucket")
        owned = time.monotonic() - dead_at
        assert node_b.replicas_expired == 1 and node_a.replicas_expired == 0
        exact = time.monotonic()
        while True:
            matched, summary = await search(as_client(a, ep), request.name)
            if summary.unreachable == 0:
                break
            assert time.monotonic() - exact < 10, f"never reachable again: {summary}"
            await asyncio.sleep(0.2)
        again = time.monotonic() - dead_at
        assert matched == [instance_id] and summary.matched == 1
        print(
            f"\nno responders: search ended after {elapsed:.2f}s (deadline 5 s), every bucket owned by "
            f"A and B after {owned:.2f}s, the instance found again after {again:.2f}s (leases 8 s)"
        )
        assert owned < c.app.config.lease_seconds - c.app.config.renew_seconds
    finally:
        await double.stop()


async def test_no_responders_is_not_acted_on_for_itself_nor_right_after_its_own_nats_reconnect(
    replicas: list[RunningMarketplace],
) -> None:
    """After a NATS restart the others resubscribe in their own time: B ignores "no responders" for C
    while its own connection is down and for 2 s after it came back; never for itself; and then at
    most once per lease period."""
    _, b, c = replicas
    node_b, node_c = b.app.cluster, c.app.cluster
    assert node_b is not None and node_c is not None

    async def live_leases_of_c() -> int:
        async with node_b.sessions() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(BucketLeaseRow)
                .where(BucketLeaseRow.owner == node_c.replica_id, BucketLeaseRow.expires_at > func.now())
            )
        return int(count or 0)

    held_c = await live_leases_of_c()
    assert held_c > 0

    node_b._on_owner_gone(node_b.replica_id)
    node_b._on_disconnected()
    node_b._on_owner_gone(node_c.replica_id)
    node_b._on_reconnected()
    node_b._on_owner_gone(node_c.replica_id)
    await asyncio.sleep(0.3)
    assert node_b._expired_at == {} and node_b.replicas_expired == 0
    assert await live_leases_of_c() == held_c

    node_b._nats_up_since = time.monotonic() - 2.5  # reconnected long enough ago
    node_b._on_owner_gone(node_c.replica_id)
    node_b._on_owner_gone(node_c.replica_id)  # once per lease period
    # replicas_expired counts an expiry that ended at least one live lease of C.
    await until(lambda: node_b.replicas_expired == 1, 5.0, "C's leases expired by B")
    assert list(node_b._expired_at) == [node_c.replica_id]


async def collect(call: Any, into: list[Any]) -> None:
    async for message in call:
        into.append(message)


async def until(predicate: Any, timeout: float, what: str) -> float:
    """Seconds until `predicate()` holds."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_events_whose_publish_was_lost_reach_streams_on_other_replicas_once_by_the_repair(
    replicas: list[RunningMarketplace],
) -> None:
    a, b, c = replicas
    hubs = [r.app.events for r in replicas]
    assert all(isinstance(h, ClusterEventHub) for h in hubs)
    interval = b.app.config.event_repair_interval
    double = await start_aiida(AiidaDouble())
    double.double.configure_state = aiida_pb2.DataAccess.STATE_ACTIVE
    try:
        customer = await a.customer()
        await claimed_on_double(replicas, double, customer, f"r-{secrets.token_hex(4)}")
        ep = await a.eligible_party()
        request = await create_request(ep)
        matched, _ = await search(ep, request.name)

        on_b, on_c = as_client(b, customer), as_client(c, ep)
        consent = on_b.consent.Connect(iter(()), metadata=on_b.metadata)
        watch = on_c.access.WatchPermissions(
            access_pb2.WatchPermissionsRequest(data_request=request.name), metadata=on_c.metadata
        )
        to_customer: list[Any] = []
        to_ep: list[Any] = []
        readers = [
            asyncio.create_task(collect(consent, to_customer)),
            asyncio.create_task(collect(watch, to_ep)),
        ]
        try:
            await until(lambda: any(m.HasField("ready") for m in to_customer), 10, "consent stream ready")
            await asyncio.sleep(0.2)  # the watch on C has subscribed

            # Every publish from A is lost: the request reaches B's and C's streams by the repair only.
            a.app.events.publish_filter = lambda _: False  # type: ignore[attr-defined]
            [permission] = (
                await ep.access.RequestAccess(
                    access_pb2.RequestAccessRequest(
                        data_request=request.name, instance_ids=matched, sink_uri=SINK_URI
                    ),
                    metadata=ep.metadata,
                )
            ).permissions
            shown = await until(
                lambda: any(m.access_request.permission.name == permission.name for m in to_customer),
                4 * interval + 5,
                "the access request on the customer's stream at B",
            )
            pending = await until(
                lambda: any(m.permission.name == permission.name for m in to_ep),
                4 * interval + 5,
                "the new permission on the EP's watch at C",
            )
            print(f"\nlost publishes repaired after {shown:.2f}s (consent, B) and {pending:.2f}s (watch, C)")
            assert b.app.events.repaired >= 1 and c.app.events.repaired >= 1  # type: ignore[attr-defined]

            # Now B loses its publishes: the decision made at B reaches the EP's watch at C all the same.
            a.app.events.publish_filter = lambda _: True  # type: ignore[attr-defined]
            b.app.events.publish_filter = lambda _: False  # type: ignore[attr-defined]
            await on_b.consent.DecideAccess(
                consent_pb2.DecideAccessRequest(permission=permission.name, approve=True),
                metadata=on_b.metadata,
            )
            accepted = {access_pb2.Permission.STATE_ACCEPTED, access_pb2.Permission.STATE_ACTIVE}
            await until(
                lambda: any(
                    m.permission.name == permission.name and m.permission.state in accepted for m in to_ep
                ),
                4 * interval + 5,
                "the decision on the EP's watch at C",
            )
            await asyncio.sleep(3 * interval)  # more repair rounds: they must not repeat anything

            def versions(messages: list[Any]) -> list[tuple[str, int]]:
                out = []
                for m in messages:
                    if isinstance(m, access_pb2.PermissionEvent):
                        out.append((m.permission.name, m.permission.state))
                    elif m.HasField("access_request"):
                        out.append((m.access_request.permission.name, m.access_request.permission.state))
                    elif m.HasField("permission_update"):
                        out.append((m.permission_update.name, m.permission_update.state))
                return out

            for stream, messages in (("consent", to_customer), ("watch", to_ep)):
                seen = versions(messages)
                assert seen and len(seen) == len(set(seen)), f"{stream}: an event twice: {seen}"
                states = [state for name, state in seen if name == permission.name]
                assert states == sorted(states, key=lambda s: _rank(s)), f"{stream}: out of order {states}"
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    finally:
        await double.stop()


def _rank(state: int) -> int:
    order = [
        access_pb2.Permission.STATE_PENDING,
        access_pb2.Permission.STATE_ACCEPTED,
        access_pb2.Permission.STATE_ACTIVE,
    ]
    return order.index(state) if state in order else len(order)
