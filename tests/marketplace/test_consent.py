"""Workflow 6, customer side, and delivery to the AIIDA, through a real server and a real AIIDA double."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import access_pb2, consent_pb2
from eddie_common.errors import ResourceExhausted
from eddie_common.tokens import AUDIENCE_SINK, TokenVerifier
from marketplace_server.services.events import EventHub, PermissionChanged
from tests.support.access import (
    DAY,
    SINK_URI,
    Permission,
    aiida,
    market,
    market_config,
    matched_scene,
    read_until,
)
from tests.support.aiida_double import RunningAiida
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace, start_marketplace

__all__ = ["aiida", "market"]  # fixtures

DataAccess = aiida_pb2.DataAccess
ConnectRequest = consent_pb2.ConnectRequest


def decision(permission: Any, approve: bool, reason: str = "") -> consent_pb2.ConnectRequest:
    return ConnectRequest(
        decision=consent_pb2.Decision(permission=permission.name, approve=approve, reason=reason)
    )


class Device:
    """One consent app connection: a request queue feeding the stream."""

    def __init__(self, client: Any) -> None:
        self.outgoing: asyncio.Queue[consent_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call = client.consent.Connect(self._requests(), metadata=client.metadata)

    async def _requests(self) -> Any:
        while (request := await self.outgoing.get()) is not None:
            yield request

    async def until(self, predicate: Any) -> list[Any]:
        return await read_until(self.call, predicate)

    async def until_ready(self) -> list[Any]:
        return await self.until(lambda m: m.HasField("ready"))

    def close(self) -> None:
        self.call.cancel()


def is_update(permission: Any, state: int) -> Any:
    return lambda m: m.permission_update.name == permission.name and m.permission_update.state == state


async def test_connect_sends_pending_requests_then_ready_then_live_events_to_every_device(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1)
    customer = scene.customers[ids[0]]
    [first] = await scene.request_access(*ids)
    phone, tablet = Device(customer), Device(customer)
    try:
        for device in (phone, tablet):
            opening = await device.until_ready()
            assert [m.WhichOneof("event") for m in opening] == ["access_request", "ready"]
            shown = opening[0].access_request
            assert shown.permission == first
            assert shown.data_request.title == "Heat pump study"
            assert shown.data_request.purpose == "Grid planning research"
            assert shown.data_request.owner_display_name == "Wien Energie"
            assert shown.data_request.data_need.duration.seconds == 30 * DAY
            assert opening[1].ready.pending_count == 1
        [second] = await (await scene.sibling()).request_access(*ids)
        for device in (phone, tablet):
            [live] = await device.until(lambda m: m.HasField("access_request"))
            assert live.access_request.permission.name == second.name
        await phone.outgoing.put(decision(second, approve=True))
        answer = await phone.until(lambda m: m.HasField("permission_update"))
        assert [m.permission_update.state for m in answer] == [Permission.STATE_ACCEPTED]
        await tablet.until(is_update(second, Permission.STATE_ACCEPTED))
        await phone.outgoing.put(decision(first, approve=False, reason="too much data"))
        [rejected] = await phone.until(lambda m: m.HasField("permission_update"))
        assert rejected.permission_update.state == Permission.STATE_REJECTED
        assert rejected.permission_update.state_reason == "too much data"
        # Each change reaches the deciding device once: the next message is the AIIDA's confirmation.
        await scene.double.push_status(
            ids[0], second.name.removeprefix("permissions/"), DataAccess.STATE_ACTIVE
        )
        [active] = await phone.until(lambda m: m.HasField("permission_update"))
        assert (active.permission_update.name, active.permission_update.state) == (
            second.name,
            Permission.STATE_ACTIVE,
        )
    finally:
        phone.close()
        tablet.close()


async def test_a_failed_decision_on_the_stream_is_answered_and_the_stream_stays_open(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1)
    customer = scene.customers[ids[0]]
    [permission] = await scene.request_access(*ids)
    await scene.decide(permission, approve=False)
    device = Device(customer)
    try:
        assert [m.WhichOneof("event") for m in await device.until_ready()] == ["ready"]
        await device.outgoing.put(decision(permission, approve=True))
        await device.outgoing.put(decision(access_pb2.Permission(name="nonsense"), approve=True))
        [error] = await device.until(lambda m: m.HasField("decision_error"))
        assert error.decision_error.permission == permission.name
        assert error.decision_error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert error.decision_error.reason == "PERMISSION_ALREADY_DECIDED"
        [invalid] = await device.until(lambda m: m.HasField("decision_error"))
        assert invalid.decision_error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        [fresh] = await scene.request_access(*ids)
        await device.until(lambda m: m.HasField("access_request"))
        await device.outgoing.put(decision(fresh, approve=True))
        await device.until(is_update(fresh, Permission.STATE_ACCEPTED))
    finally:
        device.close()


async def test_decide_access_rules(market: RunningMarketplace, aiida: RunningAiida) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1)
    [permission] = await scene.request_access(*ids)
    stranger = await market.customer()
    decide = consent_pb2.DecideAccessRequest(permission=permission.name, approve=True)
    await expect_error(
        stranger.consent.DecideAccess(decide, metadata=stranger.metadata),
        grpc.StatusCode.NOT_FOUND,
        "PERMISSION_NOT_FOUND",
    )
    await expect_error(
        scene.ep.consent.DecideAccess(decide, metadata=scene.ep.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    await expect_error(
        scene.ep.consent.Connect(iter([]), metadata=scene.ep.metadata).read(),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    rejected = await scene.decide(permission, approve=False)
    assert rejected.state == Permission.STATE_REJECTED
    assert rejected.state_reason == "rejected by the customer"
    assert rejected.HasField("decide_time")
    assert not rejected.HasField("start_time")
    await expect_error(
        scene.decide(permission, approve=True),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PERMISSION_ALREADY_DECIDED",
    )


async def test_two_concurrent_decisions_cannot_both_win(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1)
    [permission] = await scene.request_access(*ids)
    results = await asyncio.gather(
        scene.decide(permission, approve=True),
        scene.decide(permission, approve=False),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert len(losers) == 1
    assert losers[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await scene.get(permission)).state == winners[0].state


async def test_approval_configures_the_aiida_with_a_sink_token_for_that_permission(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1)
    [permission] = await scene.request_access(*ids)
    accepted = await scene.decide(permission, approve=True)
    assert accepted.state == Permission.STATE_ACCEPTED
    assert accepted.start_time == accepted.decide_time
    assert accepted.end_time.seconds - accepted.start_time.seconds == 30 * DAY
    await scene.double.until(lambda: bool(scene.double.configured(ids[0])))
    [call] = scene.double.configures
    access = call.request.data_access
    permission_id = permission.name.removeprefix("permissions/")
    assert call.instance_id == ids[0]
    assert call.authorization.startswith("Bearer ")
    assert access.permission_id == permission_id
    assert access.data_need == scene.data_request.data_need
    assert access.sink_uri == SINK_URI
    assert (access.start_time, access.end_time) == (accepted.start_time, accepted.end_time)
    app = market.app
    verifier = TokenVerifier(
        {app.signing_key.key_id: app.signing_key.public_key}, issuer=app.config.issuer, audience=AUDIENCE_SINK
    )
    claims = verifier.verify(access.sink_token)
    assert claims["aud"] == AUDIENCE_SINK
    assert claims["sub"] == permission.name
    assert claims["permission_id"] == permission_id
    assert claims["eligible_party"] == scene.ep.account.name
    assert claims["instance_id"] == ids[0]
    assert abs(claims["exp"] - (accepted.end_time.seconds + 3600)) < 60
    assert (await scene.get(permission)).state == Permission.STATE_ACCEPTED
    await scene.double.push_status(ids[0], permission_id, DataAccess.STATE_ACTIVE)
    await scene.until_state(permission, Permission.STATE_ACTIVE)


async def test_the_customer_revokes_and_the_aiida_is_told(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1)
    customer = scene.customers[ids[0]]
    [permission] = await scene.request_access(*ids)
    [pending] = await (await scene.sibling()).request_access(*ids)
    scene.double.configure_state = DataAccess.STATE_ACTIVE  # like the reference AIIDA
    await scene.decide(permission, approve=True)
    await scene.until_state(permission, Permission.STATE_ACTIVE)

    def revoke(name: str, reason: str = "moving out") -> Any:
        return customer.consent.RevokePermission(
            consent_pb2.RevokePermissionRequest(name=name, reason=reason), metadata=customer.metadata
        )

    await expect_error(revoke(permission.name, reason=""), grpc.StatusCode.INVALID_ARGUMENT, field="reason")
    await expect_error(revoke(pending.name), grpc.StatusCode.FAILED_PRECONDITION, "PERMISSION_NOT_ACTIVE")
    stranger = await market.customer()
    await expect_error(
        stranger.consent.RevokePermission(
            consent_pb2.RevokePermissionRequest(name=permission.name, reason="x"), metadata=stranger.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    revoked = await revoke(permission.name)
    assert (revoked.state, revoked.state_reason) == (Permission.STATE_REVOKED, "moving out")
    await scene.double.until(lambda: len(scene.double.revokes) == 1)
    assert scene.double.revokes[0].request.permission_id == permission.name.removeprefix("permissions/")
    assert scene.double.revokes[0].request.reason == "moving out"
    await expect_error(revoke(permission.name), grpc.StatusCode.FAILED_PRECONDITION, "PERMISSION_NOT_ACTIVE")


async def test_undecided_permissions_time_out(tmp_path: Path, aiida: RunningAiida) -> None:
    market = await start_marketplace(market_config(tmp_path, decision_timeout=0.5))
    try:
        scene, ids = await matched_scene(market, aiida, instances=1)
        customer = scene.customers[ids[0]]
        device = Device(customer)
        [permission] = await scene.request_access(*ids)
        await device.until_ready()
        # Nobody reads the permission: only the sweeper can move it.
        *_, update = await device.until(lambda m: m.HasField("permission_update"))
        assert update.permission_update.name == permission.name
        assert update.permission_update.state == Permission.STATE_TIMED_OUT
        assert update.permission_update.state_reason == "no decision before the deadline"
        device.close()
        await expect_error(
            scene.decide(permission, approve=True),
            grpc.StatusCode.FAILED_PRECONDITION,
            "DECISION_DEADLINE_PASSED",
        )
        # Deciding right after the deadline, whether or not the sweeper was first, times it out.
        [late] = await scene.request_access(*ids)
        await asyncio.sleep(0.5)
        await expect_error(
            scene.decide(late, approve=True), grpc.StatusCode.FAILED_PRECONDITION, "DECISION_DEADLINE_PASSED"
        )
        assert (await scene.get(late)).state == Permission.STATE_TIMED_OUT
    finally:
        await market.channel.close()
        await market.app.stop(0.2)


async def test_an_offline_aiida_is_configured_when_it_comes_back(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1)
    [configured] = await scene.request_access(*ids)
    [revoked_early] = await (await scene.sibling()).request_access(*ids)
    await aiida.stop()
    await scene.until_linked(ids[0], linked=False)
    await scene.decide(configured, approve=True)
    await scene.decide(revoked_early, approve=True)
    customer = scene.customers[ids[0]]
    await customer.consent.RevokePermission(
        consent_pb2.RevokePermissionRequest(name=revoked_early.name, reason="changed my mind"),
        metadata=customer.metadata,
    )
    await aiida.start()
    await scene.double.until(lambda: bool(scene.double.configures) and bool(scene.double.revokes))
    assert [c.request.data_access.permission_id for c in scene.double.configures] == [
        configured.name.removeprefix("permissions/")
    ]
    assert [c.request.permission_id for c in scene.double.revokes] == [
        revoked_early.name.removeprefix("permissions/")
    ]


async def test_a_restarted_marketplace_still_delivers_an_approval(
    tmp_path: Path, aiida: RunningAiida
) -> None:
    config = market_config(tmp_path)
    first = await start_marketplace(config)
    scene, ids = await matched_scene(first, aiida, instances=1)
    [permission] = await scene.request_access(*ids)
    await aiida.stop()
    await scene.until_linked(ids[0], linked=False)
    await scene.decide(permission, approve=True)
    await first.channel.close()
    await first.app.stop(0.2)
    assert scene.double.configures == []
    second = await start_marketplace(config)
    try:
        await aiida.start()
        await scene.double.until(lambda: bool(scene.double.configures))
        assert scene.double.configures[0].request.data_access.permission_id == permission.name.removeprefix(
            "permissions/"
        )
    finally:
        await second.channel.close()
        await second.app.stop(0.2)


async def test_too_many_streams_per_account_are_refused(tmp_path: Path, aiida: RunningAiida) -> None:
    market = await start_marketplace(market_config(tmp_path, max_streams_per_account=2))
    try:
        customer = await market.customer()
        devices = [Device(customer), Device(customer)]
        for device in devices:
            await device.until_ready()
        extra = Device(customer)
        await expect_error(extra.call.read(), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
        devices[0].close()
        while market.app.events.stream_count(customer.account.name.removeprefix("accounts/")) > 1:
            await asyncio.sleep(0.01)
        replacement = Device(customer)
        await replacement.until_ready()
        for device in (*devices, replacement):
            device.close()
    finally:
        await market.channel.close()
        await market.app.stop(0.2)


async def test_a_subscriber_that_falls_behind_is_dropped_without_blocking_others() -> None:
    hub = EventHub(max_streams_per_account=4, queue_size=2)
    with hub.subscribe("customer") as slow, hub.subscribe("customer") as fast:
        for i in range(3):  # three permissions (a stream takes each version of one permission once)
            event = PermissionChanged(
                access_pb2.Permission(name=f"permissions/p{i}"), 1, "customer", "ep", "dr"
            )
            hub.publish([event])
            assert await fast.next() == event
        assert slow.dropped
        with pytest.raises(ResourceExhausted) as caught:
            await slow.next()
        assert caught.value.reason == "SUBSCRIBER_TOO_SLOW"
        assert hub.stream_count("customer") == 1


async def test_a_stream_takes_each_version_of_a_permission_once_and_never_an_older_one() -> None:
    """An event published and also repaired (cluster mode), or arriving after a newer one, is skipped."""
    hub = EventHub(max_streams_per_account=4)
    P = access_pb2.Permission

    def changed(state: int) -> PermissionChanged:
        return PermissionChanged(
            P(name="permissions/p", state=state), P.STATE_PENDING, "customer", "ep", "dr"
        )  # type: ignore[arg-type]

    with hub.subscribe("customer") as stream:
        for state in (P.STATE_ACCEPTED, P.STATE_ACCEPTED, P.STATE_ACTIVE, P.STATE_ACCEPTED, P.STATE_REVOKED):
            hub.publish([changed(state)])
        got = [stream._queue.get_nowait() for _ in range(stream._queue.qsize())]
    assert [e.permission.state for e in got] == [P.STATE_ACCEPTED, P.STATE_ACTIVE, P.STATE_REVOKED]  # type: ignore[union-attr]
