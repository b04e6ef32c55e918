"""The holes the first wave's review found (issue 15, point 6), each closed and kept closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import data_request_pb2
from marketplace_server.db.models import IdempotencyKeyRow
from marketplace_server.login_throttle import FREE_FAILURES, LoginThrottle
from tests.support.access import (
    Permission,
    aiida,
    data_need,
    market,
    market_config,
    matched_scene,
    new_scene,
)
from tests.support.aiida_double import RunningAiida
from tests.support.marketplace import RunningMarketplace, start_marketplace

__all__ = ["aiida", "market"]  # fixtures

DataAccess = aiida_pb2.DataAccess


# --- RequestAccess returns a live permission instead of creating a second ---


async def test_request_access_returns_the_live_permission_instead_of_a_second(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, [matched, other] = await matched_scene(market, aiida, instances=2)
    [pending] = await scene.request_access(matched)
    # PENDING: the same permission, and a new one only for the instance that had none.
    again, fresh = await scene.request_access(matched, other)
    assert again.name == pending.name and again.state == Permission.STATE_PENDING
    assert fresh.name != pending.name and fresh.instance_id == other
    # ACCEPTED / ACTIVE: still the same one.
    scene.double.configure_state = DataAccess.STATE_ACTIVE
    await scene.decide(pending, approve=True)
    await scene.until_state(pending, Permission.STATE_ACTIVE)
    [active] = await scene.request_access(matched)
    assert (active.name, active.state) == (pending.name, Permission.STATE_ACTIVE)
    # Once it has ended, asking again creates a new permission.
    await scene.decide(fresh, approve=False)
    [after_reject] = await scene.request_access(other)
    assert after_reject.name != fresh.name and after_reject.state == Permission.STATE_PENDING


# --- a permission reaches FULFILLED at its end time even if its AIIDA is silent ---


async def test_a_permission_is_fulfilled_at_its_end_time_and_the_silent_aiida_is_told(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida, duration_seconds=1)
    instance_id = await scene.add_instance()
    assert await scene.search() == [instance_id]
    [permission] = await scene.request_access(instance_id)
    scene.double.configure_state = DataAccess.STATE_ACTIVE  # and then it never reports the end
    await scene.decide(permission, approve=True)
    fulfilled = await scene.until_state(permission, Permission.STATE_FULFILLED)
    assert fulfilled.state_reason == "the data window ended"
    assert fulfilled.end_time.ToDatetime() <= fulfilled.update_time.ToDatetime()
    await scene.double.until(lambda: len(scene.double.revokes) == 1)
    told = scene.double.revokes[0].request
    assert (told.permission_id, told.reason) == (
        permission.name.removeprefix("permissions/"),
        fulfilled.state_reason,
    )
    assert (await scene.get(permission)).state == Permission.STATE_FULFILLED


# --- idempotency keys expire and are cleaned up ---


@pytest.fixture
async def short_memory(tmp_path: Path) -> AsyncIterator[RunningMarketplace]:
    running = await start_marketplace(market_config(tmp_path, idempotency_ttl=0.5))
    yield running
    await running.channel.close()
    await running.app.stop(0.2)


async def _keys(market: RunningMarketplace) -> int:
    async with market.app.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(IdempotencyKeyRow)) or 0)


async def test_idempotency_keys_expire_and_are_cleaned_up(short_memory: RunningMarketplace) -> None:
    ep = await short_memory.eligible_party("Wien Energie")

    async def create(request_id: str) -> str:
        created = await ep.data_requests.CreateDataRequest(
            data_request_pb2.CreateDataRequestRequest(
                data_request=data_request_pb2.DataRequest(
                    title="Heat pump study", purpose="Grid planning", data_need=data_need()
                ),
                request_id=request_id,
            ),
            metadata=ep.metadata,
        )
        return created.name

    first = await create("req-1")
    assert await create("req-1") == first  # remembered
    await asyncio.sleep(0.6)
    # Expired: the id is free again, and a retry creates anew.
    second = await create("req-1")
    assert second != first
    assert await create("req-1") == second
    await create("req-2")
    assert await _keys(short_memory) == 2
    await asyncio.sleep(0.6)
    assert await short_memory.app.idempotency_janitor.delete_expired() == 2
    assert await _keys(short_memory) == 0


# --- failed sign-ins slow an account down but never lock it ---


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_failed_sign_ins_limit_the_peer_and_only_slow_the_account() -> None:
    clock = _Clock()
    throttle = LoginThrottle(10, max_delay=1.0, clock=clock)
    for _ in range(FREE_FAILURES):
        async with throttle.attempt("attacker"):
            await throttle.record_failure("victim@example.org")
    assert await throttle.delay("victim@example.org") > 0
    for _ in range(100):
        async with throttle.attempt(f"botnet-{_}"):
            await throttle.record_failure("victim@example.org")
    assert await throttle.delay("victim@example.org") == 1.0  # capped: the owner still gets in
    async with throttle.attempt("victims-phone") as attempt:  # another peer is not limited
        assert await throttle.delay("bystander@example.org") == 0.0
        # The slow-down wears off, and ends when the owner signs in.
        clock.now += 3600
        assert await throttle.delay("victim@example.org") == 0.0
        await throttle.record_failure("victim@example.org")
        await throttle.record_success(attempt, "victim@example.org")
    assert await throttle.delay("victim@example.org") == 0.0
