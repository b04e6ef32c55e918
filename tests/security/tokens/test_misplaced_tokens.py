"""4, 5, 7, 8: every kind of token is accepted only where it belongs: token kinds and the refresh call,
marketplace-to-AIIDA tokens in fleet mode, a sink token bound to its one permission."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import jwt
import pytest
from sqlalchemy import func, select

from eddie.aiida.v1 import aiida_pb2_grpc
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import identity_pb2, instance_pb2
from eddie_common.interceptors import error_info
from marketplace_server.db.models import RefreshTokenRow
from tests.support.expect import expect_error
from tests.support.token_forgery import base_claims
from tests.support.token_programs import (
    CALL_TIMEOUT,
    INSTANCE,
    OTHER_INSTANCE,
    OTHER_PERMISSION,
    PERMISSION,
    UNAUTHENTICATED,
    Programs,
    call,
    expect_refused,
    identity,
    instances,
    publish,
)

pytestmark = pytest.mark.asyncio(loop_scope="package")

# --- 4, 5, 7, 8: every kind of token against every place it does not belong ----------------------


def token_of_kind(p: Programs, kind: str) -> str:
    if kind == "access":  # the customer's, from CreateToken
        return p.customer.token
    if kind == "ep-access":
        return p.ep.token
    if kind == "refresh":  # opaque, from CreateToken
        return p.customer.refresh_token
    if kind == "aiida":  # minted by the connection manager for INSTANCE
        return p.aiida_token(INSTANCE)
    if kind == "sink":  # bound to PERMISSION
        return p.sink_token
    if kind == "other-sink":
        return p.mint_sink_token(OTHER_PERMISSION)
    # Right signature, audience `marketplace`, but not an access token.
    typ = {"typed-refresh": "refresh", "typed-id": "id", "untyped": None}[kind]
    claims = base_claims(p, "marketplace")
    if typ is None:
        del claims["typ"]
    else:
        claims["typ"] = typ
    return jwt.encode(claims, p.key.private_key, algorithm="ES256", headers={"kid": p.key.key_id})


CONFUSIONS = [
    # The marketplace takes only access tokens.
    ("marketplace", "access", None),
    ("marketplace", "refresh", "TOKEN_INVALID"),
    ("marketplace", "aiida", "TOKEN_WRONG_AUDIENCE"),
    ("marketplace", "sink", "TOKEN_WRONG_AUDIENCE"),
    ("marketplace", "typed-refresh", "TOKEN_WRONG_TYPE"),
    ("marketplace", "typed-id", "TOKEN_WRONG_TYPE"),
    ("marketplace", "untyped", "TOKEN_WRONG_TYPE"),
    # An instance takes only the marketplace's token for that instance.
    ("aiida", "aiida", None),
    ("aiida", "access", "TOKEN_WRONG_AUDIENCE"),
    ("aiida", "refresh", "TOKEN_INVALID"),
    ("aiida", "sink", "TOKEN_WRONG_AUDIENCE"),
    ("aiida", "typed-refresh", "TOKEN_WRONG_AUDIENCE"),
    # Publish takes only a sink token (of the permission the readings belong to: see below).
    ("sink-publish", "sink", None),
    ("sink-publish", "access", "TOKEN_WRONG_AUDIENCE"),
    ("sink-publish", "ep-access", "TOKEN_WRONG_AUDIENCE"),
    ("sink-publish", "refresh", "TOKEN_INVALID"),
    ("sink-publish", "aiida", "TOKEN_WRONG_AUDIENCE"),
    # ListReadings takes only an access token.
    ("sink-list", "ep-access", None),
    ("sink-list", "sink", "TOKEN_WRONG_AUDIENCE"),
    ("sink-list", "other-sink", "TOKEN_WRONG_AUDIENCE"),
    ("sink-list", "refresh", "TOKEN_INVALID"),
    ("sink-list", "aiida", "TOKEN_WRONG_AUDIENCE"),
    ("sink-list", "typed-refresh", "TOKEN_WRONG_TYPE"),
    ("sink-list", "typed-id", "TOKEN_WRONG_TYPE"),
]


@pytest.mark.parametrize(
    ("target", "kind", "reason"), [pytest.param(*c, id=f"{c[1]}-at-{c[0]}") for c in CONFUSIONS]
)
async def test_each_kind_of_token_is_accepted_only_where_it_belongs(
    programs: Programs, target: str, kind: str, reason: str | None
) -> None:
    token = token_of_kind(programs, kind)
    if reason is None:
        await call(programs, target, f"Bearer {token}")
    else:
        await expect_refused(programs, target, token, reason)


@pytest.mark.parametrize("kind", ["access", "aiida", "sink", "typed-refresh"])
async def test_refresh_token_call_refuses_every_other_kind_of_token_and_issues_nothing(
    programs: Programs, kind: str
) -> None:
    sessions = programs.market.app.sessions
    count = select(func.count()).select_from(RefreshTokenRow)
    async with sessions() as session:
        before = await session.scalar(count)
    err = await expect_error(
        identity(programs.market.channel).RefreshToken(
            identity_pb2.RefreshTokenRequest(refresh_token=token_of_kind(programs, kind)),
            timeout=CALL_TIMEOUT,
        ),
        UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )
    assert (err.details() or "").startswith("invalid refresh token")
    async with sessions() as session:
        assert await session.scalar(count) == before


async def test_a_refused_refresh_attempt_leaves_the_real_refresh_token_usable(programs: Programs) -> None:
    client = await programs.market.customer()
    stub = identity(programs.market.channel)
    await expect_error(
        stub.RefreshToken(identity_pb2.RefreshTokenRequest(refresh_token=client.token)),
        UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )
    rotated = await stub.RefreshToken(identity_pb2.RefreshTokenRequest(refresh_token=client.refresh_token))
    assert rotated.access_token and rotated.refresh_token != client.refresh_token


# --- 7: marketplace-to-AIIDA tokens in fleet mode ---------------------------------------------------


async def test_a_fleet_instance_refuses_the_token_of_its_neighbour(programs: Programs) -> None:
    token = programs.aiida_token(INSTANCE)
    # Accepted (and cached) for its own instance first, then replayed at the neighbour on the same port.
    await call(programs, "aiida", f"Bearer {token}", INSTANCE)
    await expect_refused(programs, "aiida", token, "INSTANCE_MISMATCH", instance_id=OTHER_INSTANCE)
    await call(programs, "aiida", f"Bearer {programs.aiida_token(OTHER_INSTANCE)}", OTHER_INSTANCE)
    # The long-lived stream is checked the same way.
    stream = aiida_pb2_grpc.AiidaServiceStub(programs.aiida_channel).Connect(
        metadata=(("authorization", f"Bearer {token}"), ("aiida-instance-id", OTHER_INSTANCE)),
        timeout=CALL_TIMEOUT,
    )
    err = await expect_error(stream.read(), UNAUTHENTICATED, "INSTANCE_MISMATCH")
    assert error_info(err) is not None


async def test_an_aiida_token_is_refused_by_every_marketplace_service(programs: Programs) -> None:
    token = programs.aiida_token(INSTANCE)
    client = programs.market.client(token)
    calls: dict[str, Awaitable[Any]] = {
        "GetCurrentAccount": identity(client.channel).GetCurrentAccount(
            identity_pb2.GetCurrentAccountRequest(), metadata=client.metadata
        ),
        "ListInstances": instances(client.channel).ListInstances(
            instance_pb2.ListInstancesRequest(), metadata=client.metadata
        ),
        "GetInstance": instances(client.channel).GetInstance(
            instance_pb2.GetInstanceRequest(name=f"instances/{INSTANCE}"), metadata=client.metadata
        ),
    }
    for name, pending in calls.items():
        err = await expect_error(pending, UNAUTHENTICATED, "TOKEN_WRONG_AUDIENCE")
        assert error_info(err) is not None, name


# --- 8: a sink token is bound to its one permission ---------------------------------------------


async def test_a_sink_token_publishes_only_its_own_permission(programs: Programs) -> None:
    err = await expect_error(
        publish(programs, f"Bearer {programs.sink_token}", OTHER_PERMISSION),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_MISMATCH",
    )
    info = error_info(err)
    assert info is not None and info.domain == "framework.eddie"
    # The other permission's own token works; the first token still cannot list either permission.
    assert await publish(programs, f"Bearer {token_of_kind(programs, 'other-sink')}", OTHER_PERMISSION) == 1
    for permission_id in (PERMISSION, OTHER_PERMISSION):
        await expect_error(
            data_sink_pb2_grpc.DataSinkServiceStub(programs.sink_channel).ListReadings(
                data_sink_pb2.ListReadingsRequest(permission_id=permission_id),
                metadata=(("authorization", f"Bearer {programs.sink_token}"),),
            ),
            UNAUTHENTICATED,
            "TOKEN_WRONG_AUDIENCE",
        )
