"""Live streams never carry another tenant's events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from eddie.marketplace.v1 import access_pb2, consent_pb2
from tests.support.authorization import FIRST_MESSAGE, STREAM_IDLE, Ctx, Permission, new_pending
from tests.support.authorization_checks import permissions_in

pytestmark = pytest.mark.asyncio(loop_scope="package")

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


@pytest.mark.parametrize("actor", ["A", "B"])
async def test_live_streams_never_carry_another_tenants_events(ctx: Ctx, actor: str) -> None:
    """A new access request and its decision reach the actor's streams and nobody else's."""
    t, other = (ctx.a, ctx.b) if actor == "A" else (ctx.b, ctx.a)
    calls: dict[str, Any] = {
        "own_watch": t.ep.access.WatchPermissions(
            access_pb2.WatchPermissionsRequest(), metadata=t.ep.metadata
        ),
        "own_consent": t.customer.consent.Connect(metadata=t.customer.metadata),
        "other_watch": other.ep.access.WatchPermissions(
            access_pb2.WatchPermissionsRequest(), metadata=other.ep.metadata
        ),
        "other_consent": other.customer.consent.Connect(metadata=other.customer.metadata),
    }
    seen: dict[str, list[Any]] = {name: [] for name in calls}
    try:
        for name in ("own_consent", "other_consent"):
            await _until(calls[name], lambda m: m.HasField("ready"), seen[name])
        for name in ("own_watch", "other_watch"):
            await _until(calls[name], lambda m: True, seen[name])  # the snapshot has begun
        for name in calls:
            seen[name].clear()

        new = await new_pending(t)
        await _until(calls["own_watch"], lambda m: m.permission.name == new, seen["own_watch"])
        await _until(
            calls["own_consent"],
            lambda m: m.HasField("access_request") and m.access_request.permission.name == new,
            seen["own_consent"],
        )
        await t.customer.consent.DecideAccess(
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
        leaked = [p.name for p in permissions_in(seen[name]) if account not in (p.customer, p.eligible_party)]
        assert not leaked, f"{name} carried another tenant's permissions: {leaked}"
        assert new not in {p.name for p in permissions_in(seen[name])}
    for name, account in (("own_watch", t.ep_name), ("own_consent", t.customer_name)):
        assert all(account in (p.customer, p.eligible_party) for p in permissions_in(seen[name]))
