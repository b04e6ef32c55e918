"""Workflow 6 end to end with real processes: marketplace, two AIIDAs, one EP sink.

Customers decide on their live consent streams; the approving AIIDA streams
readings of exactly the requested tags and interval to the sink; the EP's
watch sees every transition; revocation stops the data; the window's end
gives FULFILLED.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from eddie.marketplace.v1 import access_pb2, consent_pb2
from eddie_client.client import (
    ROLE_CUSTOMER,
    ROLE_ELIGIBLE_PARTY,
    MarketplaceClient,
    Session,
    data_need,
    list_readings,
)
from tests.support.cast import Cast
from tests.support.expect import eventually

pytestmark = pytest.mark.e2e
PASSWORD = "end to end passphrase"
S = access_pb2.Permission.State


async def _setup(cast: Cast) -> tuple[MarketplaceClient, Session, dict[str, Session]]:
    mp = MarketplaceClient(cast.marketplace.address)
    ep = await mp.sign_up(ROLE_ELIGIBLE_PARTY, "ep@e2e.example", PASSWORD, "E2E Research")
    customers = {}
    for who, (_, code) in cast.aiidas.items():
        customers[who] = await mp.sign_up(ROLE_CUSTOMER, f"{who}@e2e.example", PASSWORD, who.title())
        for _ in range(50):  # the AIIDA registers in the background at start-up
            try:
                await customers[who].claim(f"aiida-{who}", code)
                break
            except Exception:
                await asyncio.sleep(0.1)
    for session in customers.values():
        while not all(i.connected for i in await session.list_instances()):
            await asyncio.sleep(0.05)
    return mp, ep, customers


async def _events(ep: Session, data_request: str) -> AsyncIterator[access_pb2.Permission]:
    call = ep.access.WatchPermissions(
        access_pb2.WatchPermissionsRequest(data_request=data_request), metadata=ep.metadata
    )
    try:
        async for event in call:
            yield event.permission
    finally:
        call.cancel()


async def _decide_on_stream(customer: Session, approve: bool) -> access_pb2.Permission:
    call = customer.consent.Connect(metadata=customer.metadata)
    try:
        async for message in call:
            if message.HasField("access_request"):
                await call.write(
                    consent_pb2.ConnectRequest(
                        decision=consent_pb2.Decision(
                            permission=message.access_request.permission.name, approve=approve, reason="e2e"
                        )
                    )
                )
            elif message.HasField("permission_update") and message.permission_update.state != S.STATE_PENDING:
                return message.permission_update
        raise AssertionError("consent stream ended")
    finally:
        call.cancel()


async def _readings(cast: Cast, ep: Session, permission: access_pb2.Permission) -> list[object]:
    return await list_readings(cast.sink.address, permission.name.removeprefix("permissions/"), ep.token)


async def test_whole_workflow_six_with_real_processes(cast: Cast) -> None:
    mp, ep, customers = await _setup(cast)
    need = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 180, ["AT"])
    request = await ep.create_data_request("Load study", "Grid planning", need)
    matches, _ = await ep.search(request.name, timeout=3)
    assert sorted(matches) == ["aiida-alice", "aiida-bernd"]

    transitions: dict[str, list[int]] = {}

    async def watch() -> None:
        async for p in _events(ep, request.name):
            states = transitions.setdefault(p.instance_id, [])
            if not states or states[-1] != p.state:
                states.append(p.state)

    watcher = asyncio.create_task(watch())
    apps = [
        asyncio.create_task(_decide_on_stream(customers["alice"], True)),
        asyncio.create_task(_decide_on_stream(customers["bernd"], False)),
    ]
    await asyncio.sleep(0.3)
    permissions = {
        p.instance_id: p
        for p in await ep.request_access(request.name, matches, f"grpc://{cast.sink.address}")
    }
    alice_decision, bernd_decision = await asyncio.wait_for(asyncio.gather(*apps), 10)
    assert alice_decision.state == S.STATE_ACCEPTED
    assert bernd_decision.state == S.STATE_REJECTED and bernd_decision.state_reason

    alice = permissions["aiida-alice"]
    readings = await eventually(lambda: _readings(cast, ep, alice), 10)
    assert {r.data_tag for r in readings} == {"1-0:1.8.0"}
    assert all(r.permission_id == alice.name.removeprefix("permissions/") for r in readings)
    assert all(r.unit == "kWh" for r in readings)
    # Window of 180 s simulated at 60x: FULFILLED after about 3 s, readings one simulated minute apart.
    await eventually(lambda: _state_is(ep, alice.name, S.STATE_FULFILLED), 20)
    readings = await _readings(cast, ep, alice)
    times = sorted(r.time.ToSeconds() for r in readings)
    assert len(times) >= 3
    assert {b - a for a, b in itertools.pairwise(times)} == {60}
    assert await _readings(cast, ep, permissions["aiida-bernd"]) == []
    await asyncio.sleep(0.3)
    watcher.cancel()
    assert transitions["aiida-alice"] == [
        S.STATE_PENDING,
        S.STATE_ACCEPTED,
        S.STATE_ACTIVE,
        S.STATE_FULFILLED,
    ]
    assert transitions["aiida-bernd"] == [S.STATE_PENDING, S.STATE_REJECTED]
    await mp.channel.close()


async def _state_is(ep: Session, name: str, state: int) -> bool:
    return (await ep.get_permission(name)).state == state


# Slow: the same revocation with real processes is in tests/e2e/test_sink_ends.py (a hostile publisher
# refused a second after it, the readings stopped) and in process in tests/aiida_stub/test_data_access.py.
@pytest.mark.slow
async def test_revocation_stops_the_readings_within_a_second(cast: Cast) -> None:
    mp, ep, customers = await _setup(cast)
    need = data_need("ELECTRICITY", ["1-0:1.8.0", "1-0:1.7.0"], 60, 900, 0, 86400, ["AT-9"])
    request = await ep.create_data_request("Long study", "Research", need)
    matches, _ = await ep.search(request.name, timeout=3)
    assert matches == ["aiida-alice"]
    (permission,) = await ep.request_access(request.name, matches, f"grpc://{cast.sink.address}")
    await customers["alice"].decide(permission.name, True)
    await eventually(lambda: _state_is(ep, permission.name, S.STATE_ACTIVE), 10)
    readings = await eventually(lambda: _readings(cast, ep, permission), 10)
    assert {r.data_tag for r in readings} <= {"1-0:1.8.0", "1-0:1.7.0"}
    await asyncio.sleep(2.5)
    assert {r.data_tag for r in await _readings(cast, ep, permission)} == {"1-0:1.8.0", "1-0:1.7.0"}
    await customers["alice"].consent.RevokePermission(
        consent_pb2.RevokePermissionRequest(name=permission.name, reason="enough"),
        metadata=customers["alice"].metadata,
    )
    await asyncio.sleep(1.0)
    settled = len(await _readings(cast, ep, permission))
    await asyncio.sleep(2.0)
    assert len(await _readings(cast, ep, permission)) == settled, "readings kept arriving after revocation"
    assert (await ep.get_permission(permission.name)).state == S.STATE_REVOKED
    await mp.channel.close()
