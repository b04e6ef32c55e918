"""Permission events across replicas over a real NATS server (skipped when 127.0.0.1:4222 is down)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator

import pytest

from eddie.marketplace.v1 import access_pb2, data_request_pb2
from marketplace_server.cluster.events import ClusterEventHub, decode_event, encode_event
from marketplace_server.services.events import AccessRequested, PermissionChanged

pytestmark = pytest.mark.nats
NATS_URL = "nats://127.0.0.1:4222"
ACTIVE = access_pb2.Permission.STATE_ACTIVE


def nats_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
async def replicas() -> AsyncIterator[list[ClusterEventHub]]:
    if not nats_reachable():
        pytest.skip("NATS is not reachable on 127.0.0.1:4222")
    import nats

    prefix = f"test{secrets.token_hex(6)}"  # this run's own subjects on the shared server
    connections = [await nats.connect(NATS_URL) for _ in range(3)]
    hubs = [ClusterEventHub(16, nc, prefix, f"replica-{i}") for i, nc in enumerate(connections)]
    for hub in hubs:
        await hub.start()
    for nc in connections:
        await nc.flush()
    yield hubs
    for nc in connections:
        await nc.close()


def changed(state: int = ACTIVE) -> PermissionChanged:
    permission = access_pb2.Permission(name="permissions/p1", state=state)  # type: ignore[arg-type]
    permission.update_time.GetCurrentTime()
    return PermissionChanged(permission, access_pb2.Permission.STATE_ACCEPTED, "cust", "ep", "dr1")


def requested() -> AccessRequested:
    permission = access_pb2.Permission(name="permissions/p2", state=access_pb2.Permission.STATE_PENDING)
    return AccessRequested(permission, data_request_pb2.DataRequest(name="dataRequests/dr1"), "cust")


async def test_an_access_request_made_at_one_replica_reaches_a_stream_held_by_another(
    replicas: list[ClusterEventHub],
) -> None:
    a, b, _ = replicas
    with b.subscribe("cust") as stream:
        started = time.perf_counter()
        a.publish([requested()])
        event = await asyncio.wait_for(stream.next(), 5)
        elapsed_ms = (time.perf_counter() - started) * 1000
    assert isinstance(event, AccessRequested)
    assert event.permission.name == "permissions/p2"
    print(f"cross-replica access request: {elapsed_ms:.1f} ms")


async def test_a_change_reaches_the_customer_and_the_ep_wherever_they_are_and_only_once(
    replicas: list[ClusterEventHub],
) -> None:
    a, b, c = replicas
    with a.subscribe("ep") as ep_here, b.subscribe("cust") as customer, c.subscribe("ep") as ep_there:
        a.publish([changed()])
        got = [await asyncio.wait_for(s.next(), 5) for s in (ep_here, customer, ep_there)]
        await a.flush()
        await asyncio.sleep(0.2)  # a duplicate (the publisher's own echo) would have arrived by now
        assert ep_here._queue.empty() and customer._queue.empty() and ep_there._queue.empty()
    assert all(isinstance(e, PermissionChanged) and e.permission.state == ACTIVE for e in got)


async def test_malformed_messages_are_dropped_and_the_hub_keeps_working(
    replicas: list[ClusterEventHub],
) -> None:
    a, b, _ = replicas
    with b.subscribe("cust") as stream:
        await a.messaging.publish(f"{a.prefix}.events.cust", b"{not json")
        a.publish([requested()])
        event = await asyncio.wait_for(stream.next(), 5)
    assert isinstance(event, AccessRequested)


def test_events_round_trip_through_their_encoding() -> None:
    for original in (changed(), requested()):
        origin, event = decode_event(encode_event(original, "r1"))
        assert (origin, event) == ("r1", original)
    with pytest.raises(ValueError, match="malformed"):
        decode_event(b'{"kind": "other"}')


async def test_the_hubs_listeners_hear_of_changes_made_at_other_replicas_once(
    replicas: list[ClusterEventHub],
) -> None:
    a, b, _ = replicas
    heard: list[object] = []
    b.listeners.append(heard.extend)
    a.publish([changed()])  # published to the customer's and the EP's subjects
    await a.flush()
    for _ in range(50):
        if heard:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert len(heard) == 1 and isinstance(heard[0], PermissionChanged)
