"""Fixtures: one world of two tenants, on one event loop, for the whole authorization package."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from eddie.marketplace.v1 import identity_pb2
from tests.support.authorization import CALLERS, Ctx, build_tenant
from tests.support.world import PASSWORD, build_world, register_and_claim


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def ctx(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Ctx]:
    world = await build_world(tmp_path_factory.mktemp("authz"))
    try:
        # Tenant A is the world's customer and EP (its customer owns fuzz-claimed-1); tenant B is
        # the world's "other" customer and EP, with an instance of their own on the same AIIDA double.
        await register_and_claim(world, "authz-b-1", world.other_customer)
        a = await build_tenant(world.customer, world.ep, "fuzz-claimed-1")
        b = await build_tenant(world.other_customer, world.other_ep, "authz-b-1")
        email = a.customer.account.email  # type: ignore[union-attr]
        refresh_tokens = []
        for _ in CALLERS:
            token = await world.market.client().identity.CreateToken(
                identity_pb2.CreateTokenRequest(email=email, password=PASSWORD)
            )
            refresh_tokens.append(token.refresh_token)
        yield Ctx(world, a, b, refresh_tokens)
    finally:
        await world.close()
