"""6: an unexpired token of a disabled or deleted account is refused, promptly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from sqlalchemy import delete, update

from eddie.marketplace.v1 import identity_pb2, instance_pb2
from eddie_client.client import Session
from marketplace_server.auth import AccessTokenAuthenticator
from marketplace_server.db.models import AccountRow, RefreshTokenRow
from tests.support.expect import expect_error
from tests.support.token_programs import CALL_TIMEOUT, UNAUTHENTICATED, Programs, identity, instances

pytestmark = pytest.mark.asyncio(loop_scope="package")

# --- 6: disabled and deleted accounts --------------------------------------------------------------


async def _disable(p: Programs, account_id: str) -> None:
    async with p.market.app.sessions.begin() as session:
        await session.execute(update(AccountRow).where(AccountRow.id == account_id).values(disabled=True))


async def _delete(p: Programs, account_id: str) -> None:
    async with p.market.app.sessions.begin() as session:
        await session.execute(delete(RefreshTokenRow).where(RefreshTokenRow.account_id == account_id))
        await session.execute(delete(AccountRow).where(AccountRow.id == account_id))


async def _refused_within(client: Session, bound: float) -> float:
    """Polls ListInstances (which trusts the authenticator alone) until it is refused; returns the wait."""
    start = time.monotonic()
    while True:
        call = instances(client.channel).ListInstances(
            instance_pb2.ListInstancesRequest(), metadata=client.metadata, timeout=CALL_TIMEOUT
        )
        if await call.code() != grpc.StatusCode.OK:
            await expect_error(call, UNAUTHENTICATED, "ACCOUNT_DISABLED")
            return time.monotonic() - start
        waited = time.monotonic() - start
        assert waited < bound, f"still accepted {waited:.2f}s after the account was changed"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("change", [_disable, _delete], ids=["disabled", "deleted"])
@pytest.mark.parametrize("warm", [False, True], ids=["first-use", "recently-used"])
async def test_an_unexpired_token_of_a_disabled_or_deleted_account_is_refused(
    programs: Programs, change: Callable[[Programs, str], Any], warm: bool
) -> None:
    # The authenticator caches "account enabled" for a short while (AccessTokenAuthenticator._CACHE_SECONDS);
    # that bound is what "promptly" means for a recently used token, and it must stay short.
    ttl = AccessTokenAuthenticator._CACHE_SECONDS
    assert ttl <= 5.0
    client = await programs.market.customer()
    assert client.account is not None
    account_id = client.account.name.removeprefix("accounts/")
    if warm:
        await instances(client.channel).ListInstances(
            instance_pb2.ListInstancesRequest(), metadata=client.metadata
        )
    await change(programs, account_id)
    waited = await _refused_within(client, ttl + 1.0)
    if not warm:
        assert waited < 0.5, "a token never seen before must be refused at once"
    # Every other way in is closed too: the account RPC re-reads the row, and so does RefreshToken.
    await expect_error(
        identity(client.channel).GetCurrentAccount(
            identity_pb2.GetCurrentAccountRequest(), metadata=client.metadata
        ),
        UNAUTHENTICATED,
        "ACCOUNT_DISABLED",
    )
    refresh_reason = "ACCOUNT_DISABLED" if change is _disable else "REFRESH_TOKEN_INVALID"
    await expect_error(
        identity(client.channel).RefreshToken(
            identity_pb2.RefreshTokenRequest(refresh_token=client.refresh_token)
        ),
        UNAUTHENTICATED,
        refresh_reason,
    )
