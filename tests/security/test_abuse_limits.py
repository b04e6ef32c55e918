"""Abuse limits: login and pairing-code guessing, search floods, and unbounded streams.

The marketplace listens on `[::]` so one test can call it from two peers:
127.0.0.1 (seen as ::ffff:127.0.0.1) and ::1, which the per-peer limits key apart.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from eddie.marketplace.v1 import access_pb2, data_request_pb2, identity_pb2, instance_pb2
from eddie_client.client import Session
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config
from tests.support.world import PASSWORD, SECRET, data_need

LIMIT = 3


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
async def market(tmp_path: Path) -> AsyncIterator[RunningMarketplace]:
    if not _ipv6_available():
        pytest.skip("needs IPv6 loopback to call from a second peer address")
    config = test_config(
        tmp_path,
        listen="[::]:0",
        login_attempts_per_minute=LIMIT,
        claim_attempts_per_minute=LIMIT,
        search_rate_per_minute=LIMIT,
        max_streams_per_account=2,
    )
    running = await start_marketplace(config)
    yield running
    await running.channel.close()
    await running.app.stop(0)


@pytest.fixture
async def v6(market: RunningMarketplace) -> AsyncIterator[grpc.aio.Channel]:
    """A second peer: the same marketplace over ::1."""
    channel = grpc.aio.insecure_channel(f"[::1]:{market.port}")
    yield channel
    await channel.close()


def login(channel: grpc.aio.Channel, email: str, password: str) -> Any:
    return Session(channel).identity.CreateToken(
        identity_pb2.CreateTokenRequest(email=email, password=password)
    )


async def _account(market: RunningMarketplace, role: int = identity_pb2.ROLE_CUSTOMER) -> Session:
    return await market.signup(role)


async def _fail_logins(channel: grpc.aio.Channel, emails: list[str]) -> None:
    for email in emails:
        await expect_error(login(channel, email, "wrong password!!"), grpc.StatusCode.UNAUTHENTICATED)


async def test_an_attackers_failed_logins_do_not_lock_the_victim_out(
    market: RunningMarketplace, v6: grpc.aio.Channel
) -> None:
    victim, bystander = await _account(market), await _account(market)
    email = victim.account.email  # type: ignore[union-attr]
    await _fail_logins(market.channel, [email] * LIMIT)
    # The attacker's peer is cut off, even with the right password ...
    await expect_error(
        login(market.channel, email, PASSWORD), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
    )
    # ... but the account is only slowed down, never locked: its owner, from another peer, signs in.
    assert (await login(v6, email, PASSWORD)).access_token
    assert (await login(v6, email.upper(), PASSWORD)).access_token
    assert (await login(v6, bystander.account.email, PASSWORD)).access_token  # type: ignore[union-attr]


async def test_failed_logins_are_limited_per_peer(market: RunningMarketplace, v6: grpc.aio.Channel) -> None:
    user = await _account(market)
    await _fail_logins(market.channel, [f"nobody{i}@example.org" for i in range(LIMIT)])  # spraying accounts
    email = user.account.email  # type: ignore[union-attr]
    await expect_error(
        login(market.channel, email, PASSWORD), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
    )
    assert (await login(v6, email, PASSWORD)).access_token  # another peer is not affected


async def test_successful_logins_do_not_count(market: RunningMarketplace) -> None:
    user = await _account(market)
    for _ in range(LIMIT * 3):
        assert (await login(market.channel, user.account.email, PASSWORD)).access_token  # type: ignore[union-attr]


async def _outcomes(calls: list[Any]) -> list[str]:
    """Runs the calls at once; each one's status code name."""

    async def outcome(call: Any) -> str:
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        return "OK"

    return list(await asyncio.gather(*(outcome(c) for c in calls)))


async def test_concurrent_right_passwords_from_one_peer_are_not_refused(market: RunningMarketplace) -> None:
    """A customer app's backend signs many users in at once from its one address: an attempt counts
    before its password is checked, but a right one gives it back, so none may be refused for the
    mere company of other right ones still being checked."""
    users = [await _account(market) for _ in range(LIMIT * 3)]
    codes = await _outcomes([login(market.channel, u.account.email, PASSWORD) for u in users])  # type: ignore[union-attr]
    assert codes == ["OK"] * len(users)


async def test_concurrent_wrong_passwords_from_one_peer_stay_limited(market: RunningMarketplace) -> None:
    codes = await _outcomes(
        [login(market.channel, f"nobody{i}@example.org", "wrong password!!") for i in range(12)]
    )
    assert codes.count("UNAUTHENTICATED") == LIMIT, codes  # only LIMIT guesses were checked
    assert codes.count("RESOURCE_EXHAUSTED") == 12 - LIMIT, codes


async def _register(market: RunningMarketplace, instance_id: str, code: str) -> None:
    await market.client().instances.RegisterInstance(
        instance_pb2.RegisterInstanceRequest(
            instance_id=instance_id, address="127.0.0.1:9", instance_secret=SECRET, pairing_code=code
        )
    )


def claim(client: Session, instance_id: str, code: str) -> Any:
    request = instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code)
    return client.instances.ClaimInstance(request, metadata=client.metadata)


async def test_pairing_code_attempts_are_limited_per_instance(
    market: RunningMarketplace, v6: grpc.aio.Channel
) -> None:
    await _register(market, "target-1", "RIGHT-CODE-1")
    await _register(market, "other-1", "RIGHT-CODE-2")
    attacker, owner = await _account(market), await _account(market)
    for i in range(LIMIT):
        await expect_error(claim(attacker, "target-1", f"GUESS-{i:04d}"), grpc.StatusCode.PERMISSION_DENIED)
    owner_v6 = Session(v6, owner.token)
    await expect_error(
        claim(owner_v6, "target-1", "RIGHT-CODE-1"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
    )
    assert (await claim(owner_v6, "other-1", "RIGHT-CODE-2")).owner == owner.account.name  # type: ignore[union-attr]


async def test_pairing_code_attempts_are_limited_per_peer(
    market: RunningMarketplace, v6: grpc.aio.Channel
) -> None:
    for i in range(LIMIT + 1):
        await _register(market, f"spray-{i}", f"RIGHT-CODE-{i}")
    attacker = await _account(market)
    for i in range(LIMIT):  # one guess at each of many devices
        await expect_error(claim(attacker, f"spray-{i}", "GUESS-0000"), grpc.StatusCode.PERMISSION_DENIED)
    last = f"spray-{LIMIT}"
    await expect_error(
        claim(attacker, last, f"RIGHT-CODE-{LIMIT}"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
    )
    owner = Session(v6, (await _account(market)).token)
    assert (await claim(owner, last, f"RIGHT-CODE-{LIMIT}")).state == instance_pb2.Instance.STATE_CLAIMED


async def test_concurrent_right_pairing_codes_from_one_peer_are_not_refused(
    market: RunningMarketplace,
) -> None:
    """An installer claims a household's devices at once: right codes are not refused as guesses."""
    for i in range(LIMIT * 3):
        await _register(market, f"house-{i}", f"RIGHT-CODE-{i}")
    owner = await _account(market)
    codes = await _outcomes([claim(owner, f"house-{i}", f"RIGHT-CODE-{i}") for i in range(LIMIT * 3)])
    assert codes == ["OK"] * (LIMIT * 3)


async def test_concurrent_wrong_pairing_codes_from_one_peer_stay_limited(market: RunningMarketplace) -> None:
    for i in range(12):
        await _register(market, f"guess-{i}", f"RIGHT-CODE-{i}")
    attacker = await _account(market)
    codes = await _outcomes([claim(attacker, f"guess-{i}", "GUESS-0000") for i in range(12)])
    assert codes.count("PERMISSION_DENIED") == LIMIT, codes
    assert codes.count("RESOURCE_EXHAUSTED") == 12 - LIMIT, codes


async def _search(ep: Session, name: str) -> list[data_request_pb2.SearchInstancesResponse]:
    request = data_request_pb2.SearchInstancesRequest(data_request=name, timeout=Duration(seconds=1))
    return [r async for r in ep.data_requests.SearchInstances(request, metadata=ep.metadata)]


async def _data_request(ep: Session) -> str:
    dr = await ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(title="t", purpose="p", data_need=data_need())
        ),
        metadata=ep.metadata,
    )
    return dr.name


async def test_searches_are_limited_per_eligible_party(market: RunningMarketplace) -> None:
    flooder, other = await _account(market, 2), await _account(market, 2)
    name, other_name = await _data_request(flooder), await _data_request(other)
    for _ in range(LIMIT):
        assert (await _search(flooder, name))[-1].HasField("summary")
    await expect_error(_search(flooder, name), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert (await _search(other, other_name))[-1].HasField("summary")


async def _first(call: Any) -> Any:
    return await asyncio.wait_for(call.read(), 5)


async def test_long_lived_streams_are_limited_per_account(market: RunningMarketplace) -> None:
    """max_streams_per_account (2 here) bounds consent and watch streams of one account at a time."""
    customer, ep, other = await _account(market), await _account(market, 2), await _account(market)
    streams = {
        "consent": (customer, lambda c: c.consent.Connect(metadata=c.metadata)),
        "watch": (
            ep,
            lambda c: c.access.WatchPermissions(access_pb2.WatchPermissionsRequest(), metadata=c.metadata),
        ),
    }
    for what, (client, open_stream) in streams.items():
        held = [open_stream(client), open_stream(client)]
        for call in held:
            if what == "consent":  # the consent stream says `ready` once it is subscribed
                assert (await _first(call)).HasField("ready")
            else:
                await asyncio.sleep(0.2)
        extra = open_stream(client)
        await expect_error(_first(extra), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
        held[0].cancel()
        hub = market.app.events
        account_id = client.account.name.removeprefix("accounts/")  # type: ignore[union-attr]
        async with asyncio.timeout(5):  # a closed stream frees its slot
            while hub.stream_count(account_id) > 1:
                await asyncio.sleep(0.01)
        again = open_stream(client)
        if what == "consent":
            assert (await _first(again)).HasField("ready")
        for call in (*held, again):
            call.cancel()
    # Another account is not affected by the first one's streams.
    assert (await _first(other.consent.Connect(metadata=other.metadata))).HasField("ready")


async def test_the_server_caps_concurrent_rpcs(tmp_path: Path) -> None:
    market = await start_marketplace(
        test_config(tmp_path, max_concurrent_rpcs=4, max_streams_per_account=100)
    )
    try:
        customer = await market.customer()
        held = [customer.consent.Connect(metadata=customer.metadata) for _ in range(4)]
        for call in held:
            assert (await _first(call)).HasField("ready")
        current = customer.identity.GetCurrentAccount(
            identity_pb2.GetCurrentAccountRequest(), metadata=customer.metadata
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await current
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in held:
            call.cancel()
        await asyncio.sleep(0.2)
        account = await customer.identity.GetCurrentAccount(
            identity_pb2.GetCurrentAccountRequest(), metadata=customer.metadata, timeout=5
        )
        assert account.name == customer.account.name  # type: ignore[union-attr]
    finally:
        await market.channel.close()
        await market.app.stop(0)
