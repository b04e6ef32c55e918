"""SinkFeedService.WatchPermissionEnds: public, each subscription proven by the permission's sink token."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import access_pb2, consent_pb2, sink_feed_pb2, sink_feed_pb2_grpc
from eddie_common.tokens import AUDIENCE_MARKETPLACE, AUDIENCE_SINK, SigningKey, TokenIssuer
from tests.support.access import Permission, aiida, market, matched_scene
from tests.support.aiida_double import RunningAiida
from tests.support.marketplace import RunningMarketplace

__all__ = ["aiida", "market"]  # fixtures

Request = sink_feed_pb2.WatchPermissionEndsRequest


def _sink_token(issuer: TokenIssuer, permission_id: str, audience: str = AUDIENCE_SINK) -> str:
    token, _ = issuer.issue(
        f"permissions/{permission_id}",
        audience,
        600,
        permission_id=permission_id,
        eligible_party="accounts/x",
        instance_id="i",
    )
    return token


async def _next(call: Any, timeout: float = 5.0) -> sink_feed_pb2.WatchPermissionEndsResponse:
    message = await asyncio.wait_for(call.read(), timeout)
    assert message is not grpc.aio.EOF
    return message  # type: ignore[no-any-return]


async def test_the_feed_reports_ends_to_holders_of_the_sink_token_only(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, [first, second] = await matched_scene(market, aiida, instances=2)
    live, ended = await scene.request_access(first, second)
    scene.double.configure_state = aiida_pb2.DataAccess.STATE_ACTIVE
    for permission in (live, ended):
        await scene.decide(permission, approve=True)
    customer = scene.customers[second]
    await customer.consent.RevokePermission(
        consent_pb2.RevokePermissionRequest(name=ended.name, reason="no more"), metadata=customer.metadata
    )
    issuer = market.app.issuer
    stranger = TokenIssuer(SigningKey.generate(), market.app.config.issuer)
    live_id, ended_id = (p.name.removeprefix("permissions/") for p in (live, ended))

    stub = sink_feed_pb2_grpc.SinkFeedServiceStub(market.channel)
    call = stub.WatchPermissionEnds()  # no account: the tokens are the proof
    try:
        # Ignored: a token of another key, of another audience, and garbage.
        for token in (
            _sink_token(stranger, ended_id),
            _sink_token(issuer, ended_id, AUDIENCE_MARKETPLACE),
            "not a token",
        ):
            await call.write(Request(sink_token=token))
        await call.write(Request(sink_token=_sink_token(issuer, ended_id)))  # already ended: at once
        at_once = await _next(call)
        assert (at_once.permission_id, at_once.ended, at_once.state) == (
            ended_id,
            True,
            Permission.STATE_REVOKED,
        )
        await call.write(Request(sink_token=_sink_token(issuer, live_id)))
        current = await _next(call)
        assert (current.permission_id, current.ended) == (live_id, False)
        assert current.end_time.seconds > 0
        await scene.ep.access.TerminatePermission(
            access_pb2.TerminatePermissionRequest(name=live.name, reason="study over"),
            metadata=scene.ep.metadata,
        )
        pushed = await _next(call, 1.0)
        assert (pushed.permission_id, pushed.ended, pushed.state) == (
            live_id,
            True,
            Permission.STATE_TERMINATED,
        )
    finally:
        call.cancel()
