"""Who may publish (a valid sink token) and who may list (the permission's eligible party)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from eddie_common import tokens
from tests.support.expect import expect_error
from tests.support.sink import (
    OTHER_EP,
    FakeMarketplace,
    RunningSink,
    free_port,
    reading,
    sink_config,
    start_fake_marketplace,
    start_sink,
)


def _token_of_another_key() -> str:
    issuer = tokens.TokenIssuer(tokens.SigningKey.generate(), issuer="test-marketplace")
    token, _ = issuer.issue(
        "permissions/perm-1",
        tokens.AUDIENCE_SINK,
        300,
        permission_id="perm-1",
        eligible_party="accounts/ep-1",
    )
    return token


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda m: None, "TOKEN_MISSING"),
        (lambda m: "", "TOKEN_MISSING"),
        (lambda m: "garbage", "TOKEN_INVALID"),
        (lambda m: _token_of_another_key(), "TOKEN_UNKNOWN_KEY"),
        (lambda m: m.sink_token(ttl=-120), "TOKEN_EXPIRED"),
        (lambda m: m.access_token(), "TOKEN_WRONG_AUDIENCE"),
        (lambda m: m.sink_token(eligible_party="nobody"), "TOKEN_INVALID"),
    ],
    ids=["missing", "empty", "garbage", "other-key", "expired", "access-token", "bad-claims"],
)
async def test_publish_without_a_valid_sink_token_is_unauthenticated(
    sink: RunningSink, fake_marketplace: FakeMarketplace, make_token, reason: str
):
    await expect_error(
        sink.publish(make_token(fake_marketplace), [reading(1)]), grpc.StatusCode.UNAUTHENTICATED, reason
    )

    await expect_error(sink.list_page(fake_marketplace.access_token()), grpc.StatusCode.NOT_FOUND)


async def test_sink_token_whose_subject_is_another_permission_is_unauthenticated(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    token, _ = fake_marketplace.issuer.issue(
        "permissions/perm-9",
        tokens.AUDIENCE_SINK,
        300,
        permission_id="perm-1",
        eligible_party="accounts/ep-1",
    )
    await expect_error(sink.publish(token, [reading(1)]), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_list_readings_by_another_eligible_party_is_not_found(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    await sink.publish(fake_marketplace.sink_token(), [reading(1)])

    await expect_error(
        sink.list_page(fake_marketplace.access_token(OTHER_EP)),
        grpc.StatusCode.NOT_FOUND,
        "PERMISSION_NOT_FOUND",
    )
    await expect_error(
        sink.list_page(fake_marketplace.access_token("accounts/customer-1", "ROLE_CUSTOMER")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_list_readings_of_unknown_permission_is_not_found(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    await expect_error(
        sink.list_page(fake_marketplace.access_token(), "no-such-permission"), grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda m: None, "TOKEN_MISSING"),
        (lambda m: m.sink_token(), "TOKEN_WRONG_AUDIENCE"),
        (lambda m: "garbage", "TOKEN_INVALID"),
    ],
    ids=["missing", "sink-token", "garbage"],
)
async def test_list_readings_without_access_token_is_unauthenticated(
    sink: RunningSink, fake_marketplace: FakeMarketplace, make_token, reason: str
):
    await sink.publish(fake_marketplace.sink_token(), [reading(1)])
    await expect_error(sink.list_page(make_token(fake_marketplace)), grpc.StatusCode.UNAUTHENTICATED, reason)


async def test_sink_started_before_the_marketplace_gets_its_keys_once_it_appears(tmp_path: Path):
    port = free_port()
    sink = await start_sink(sink_config(tmp_path, f"127.0.0.1:{port}"), wait_for_keys=False)
    marketplace = None
    try:
        await asyncio.sleep(0.3)
        assert not sink.app.keys.ready
        marketplace = await start_fake_marketplace(port)

        assert await sink.app.keys.wait_ready(8)
        assert await sink.publish(marketplace.sink_token(), [reading(1)]) == 1
        assert len(await sink.list_all(marketplace.access_token())) == 1
    finally:
        await sink.close()
        if marketplace is not None:
            await marketplace.server.stop(0)


async def test_rotated_signing_key_is_fetched_on_unknown_key_id(tmp_path: Path):
    marketplace = await start_fake_marketplace()
    sink = await start_sink(sink_config(tmp_path, marketplace.address, key_refresh_interval=0.0))
    try:
        new_key = tokens.SigningKey.generate()
        marketplace.identity.keys.insert(0, new_key)
        marketplace.issuer = tokens.TokenIssuer(new_key, issuer="test-marketplace")

        assert await sink.publish(marketplace.sink_token(), [reading(1)]) == 1
        assert marketplace.identity.calls == 2
    finally:
        await sink.close()
        await marketplace.server.stop(0)


async def test_unknown_key_ids_refetch_keys_at_most_once_per_interval(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    for _ in range(3):
        await expect_error(
            sink.publish(_token_of_another_key(), [reading(1)]),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_UNKNOWN_KEY",
        )

    assert fake_marketplace.identity.calls == 1


async def test_a_remembered_sink_token_stops_vouching_once_its_key_is_gone(tmp_path: Path):
    marketplace = await start_fake_marketplace()
    sink = await start_sink(sink_config(tmp_path, marketplace.address, key_refresh_interval=0.0))
    try:
        old_token = marketplace.sink_token()
        assert await sink.publish(old_token, [reading(1)]) == 1
        assert await sink.publish(old_token, [reading(2)]) == 1  # the second time from memory
        # The marketplace drops the old key; a token of the new one makes the sink refetch.
        new_key = tokens.SigningKey.generate()
        marketplace.identity.keys[:] = [new_key]
        marketplace.issuer = tokens.TokenIssuer(new_key, issuer="test-marketplace")
        assert await sink.publish(marketplace.sink_token(), [reading(3)]) == 1
        await expect_error(
            sink.publish(old_token, [reading(4)]), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_UNKNOWN_KEY"
        )
    finally:
        await sink.close()
        await marketplace.server.stop(0)
