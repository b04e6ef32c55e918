"""Shared state of a cluster, with three real replicas on one PostgreSQL schema and one NATS server.

One signing key ring in the database (created once, imported from a data dir, rotated at one
replica for all), rate limits that hold across replicas, idempotency and refresh-token reuse
across replicas, and a deletion refused at every replica at once.

Skipped with a reason when PostgreSQL (127.0.0.1:5432) or NATS (127.0.0.1:4222) is unreachable.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from eddie.marketplace.v1 import data_request_pb2, identity_pb2, instance_pb2
from eddie_client.client import Session, log_in
from marketplace_server.config import Config
from marketplace_server.db.session import create_engine, create_sessionmaker, migrate
from marketplace_server.keyring import load_database_key_ring, load_key_ring, rotate_signing_key
from marketplace_server.ratelimit import DatabaseRateLimiter, RateLimitJanitor
from tests.cluster.test_events import nats_reachable
from tests.cluster.test_replicas import as_client, create_request, replica_config, search, settled
from tests.support.access import SECRET, data_need
from tests.support.expect import expect_error
from tests.support.marketplace import PASSWORD, RunningMarketplace, start_marketplace
from tests.support.postgres import POSTGRES_URL, fresh_schema, postgres_execute, postgres_reachable

pytestmark = [pytest.mark.postgres, pytest.mark.nats]

REFRESH_SECONDS = 1.0  # the replicas' key_refresh_seconds in these tests (default 5 s)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
LIMITED = grpc.StatusCode.RESOURCE_EXHAUSTED


def skip_unless_reachable() -> None:
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
    if not nats_reachable():
        pytest.skip("NATS is not reachable on 127.0.0.1:4222")


@asynccontextmanager
async def cluster(
    tmp_path: Path, configure: Callable[[int, Config], Config] = lambda i, c: c, **overrides: Any
) -> AsyncIterator[tuple[list[RunningMarketplace], str, Callable[[int], Config]]]:
    """Three replicas (each its own data dir); yields them, the schema, and each one's config. A test
    may replace a replica in the list (a restart): the list's members are stopped at the end."""
    skip_unless_reachable()
    prefix = f"test{secrets.token_hex(6)}"
    async with fresh_schema() as schema:

        def config_of(index: int) -> Config:
            base = replica_config(tmp_path, schema, prefix, index)
            return configure(index, replace(base, key_refresh_seconds=REFRESH_SECONDS, **overrides))

        running: list[RunningMarketplace] = []
        try:
            for index in range(3):
                running.append(await start_marketplace(config_of(index)))
            await settled(running)
            yield running, schema, config_of
        finally:
            for replica in running:
                await replica.channel.close()
                await replica.app.stop(0.2)


async def me(session: Session) -> identity_pb2.Account:
    return await session.identity.GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=session.metadata
    )


async def accepted(session: Session) -> bool:
    """Whether the replica accepts the session's token (UNAUTHENTICATED: it does not). ListInstances
    reads no account row itself: only the authentication decides (GetCurrentAccount would read it)."""
    try:
        await session.instances.ListInstances(instance_pb2.ListInstancesRequest(), metadata=session.metadata)
    except grpc.aio.AioRpcError as err:
        if err.code() != UNAUTHENTICATED:
            raise
        return False
    return True


def kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def listed_keys(replica: RunningMarketplace) -> list[str]:
    keys = await replica.client().identity.ListSigningKeys(identity_pb2.ListSigningKeysRequest())
    return [k.key_id for k in keys.signing_keys]


async def key_rows(schema: str) -> int:
    return int(await postgres_execute(f"SELECT count(*) FROM {schema}.signing_keys"))


# --- one key ring in the database ---


async def test_a_token_signed_by_one_replica_verifies_at_every_other(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (replicas, schema, _):
        a, b, c = replicas
        customer = await a.customer()  # signed in at A: its token is signed by A
        for other in (b, c):
            assert (await me(as_client(other, customer))).name == customer.account.name
        current = {r.app.signing_key.key_id for r in replicas}
        assert current == {kid(customer.token)}, "one current key for the cluster"
        assert await key_rows(schema) == 1
        assert [await listed_keys(r) for r in replicas] == [[kid(customer.token)]] * 3
        for index in range(3):  # the ring is in the database, not in any data dir
            assert not list((tmp_path / f"replica-{index}").glob("*.pem"))


async def test_a_rotation_at_one_replica_reaches_the_others_and_old_tokens_still_verify(
    tmp_path: Path,
) -> None:
    # C re-reads the ring only rarely: a new key reaches it through a token with an unknown kid.
    def slow_c(index: int, config: Config) -> Config:
        return replace(config, key_refresh_seconds=600.0) if index == 2 else config

    async with cluster(tmp_path, slow_c) as (replicas, schema, config_of):
        a, b, c = replicas
        old_customer = await a.customer()
        old_key = kid(old_customer.token)
        device_pem = (await register(b, "rot-box")).marketplace_public_key

        await a.channel.close()
        await a.app.stop(0.2)  # A restarts with --rotate-signing-key: the cluster's ring rotates
        a = replicas[0] = await start_marketplace(replace(config_of(0), rotate_signing_key=True))
        new_key = a.app.signing_key.key_id
        assert new_key != old_key
        assert await key_rows(schema) == 2

        # A token of the new key verifies at C at once (C re-reads the ring on the unknown kid) ...
        fresh = await a.customer()
        assert kid(fresh.token) == new_key
        assert (await me(as_client(c, fresh))).name == fresh.account.name
        # ... and B signs with the new key within its refresh interval.
        deadline = time.monotonic() + REFRESH_SECONDS + 5.0
        while b.app.signing_key.key_id != new_key:
            assert time.monotonic() < deadline, "B never picked the rotated key up"
            await asyncio.sleep(0.05)
        from_b = await log_in(b.channel, fresh.account.email, PASSWORD)
        assert kid(from_b.token) == new_key
        assert (await me(as_client(c, from_b))).name == fresh.account.name

        # Tokens signed before the rotation still verify everywhere; every replica lists both keys.
        for replica in (a, b, c):
            assert (await me(as_client(replica, old_customer))).name == old_customer.account.name
            assert await listed_keys(replica) == [new_key, old_key]
        # The device key (the oldest) is unchanged: running AIIDAs keep trusting the marketplace.
        assert (await register(c, "rot-box-2")).marketplace_public_key == device_pem
        assert (await register(a, "rot-box-3")).marketplace_public_key == device_pem


async def register(replica: RunningMarketplace, instance_id: str) -> instance_pb2.RegisterInstanceResponse:
    return await replica.client().instances.RegisterInstance(
        instance_pb2.RegisterInstanceRequest(
            instance_id=instance_id,
            address="127.0.0.1:1",
            instance_secret=SECRET,
            pairing_code=f"CODE-{instance_id}",
        )
    )


async def test_replicas_starting_at_once_on_an_empty_database_end_with_one_key(tmp_path: Path) -> None:
    skip_unless_reachable()
    prefix = f"test{secrets.token_hex(6)}"
    async with fresh_schema() as schema:
        configs = [
            replace(replica_config(tmp_path, schema, prefix, i), key_refresh_seconds=REFRESH_SECONDS)
            for i in range(3)
        ]
        started = await asyncio.gather(*(start_marketplace(c) for c in configs), return_exceptions=True)
        running = [r for r in started if isinstance(r, RunningMarketplace)]
        try:
            assert len(running) == 3, f"a replica failed to start: {started}"
            assert await key_rows(schema) == 1
            assert len({r.app.signing_key.key_id for r in running}) == 1
        finally:
            for replica in running:
                await replica.channel.close()
                await replica.app.stop(0.2)


async def test_concurrent_first_loads_of_the_ring_create_one_key(tmp_path: Path) -> None:
    """The ring's creation itself, five processes' worth at once (an engine each), no replica around."""
    skip_unless_reachable()
    async with fresh_schema() as schema:
        engines = [create_engine(POSTGRES_URL, schema=schema) for _ in range(5)]
        try:
            await migrate(engines[0])
            for engine in engines:  # connected beforehand: the five transactions overlap
                async with engine.connect():
                    pass
            rings = await asyncio.gather(
                *(load_database_key_ring(create_sessionmaker(e), tmp_path / "empty") for e in engines)
            )
            assert len({ring.current.key_id for ring in rings}) == 1
            assert await key_rows(schema) == 1
        finally:
            for engine in engines:
                await engine.dispose()


async def test_a_data_dir_ring_is_imported_on_the_first_start(tmp_path: Path) -> None:
    """A single-process deployment moving to the database keeps its keys (and what they signed)."""
    skip_unless_reachable()
    files = tmp_path / "single"
    device = load_key_ring(files).current
    current = rotate_signing_key(files)
    prefix = f"test{secrets.token_hex(6)}"
    async with fresh_schema() as schema:
        config = replace(replica_config(tmp_path, schema, prefix, 0), data_dir=files)
        replica = await start_marketplace(config)
        try:
            assert replica.app.signing_key.key_id == current.key_id
            assert await listed_keys(replica) == [current.key_id, device.key_id]
            response = await register(replica, "import-box")
            assert response.marketplace_public_key == device.public_pem  # the device key stays the oldest
        finally:
            await replica.channel.close()
            await replica.app.stop(0.2)


# --- rate limits across replicas ---


async def test_sign_in_pairing_code_and_search_limits_hold_across_replicas(tmp_path: Path) -> None:
    limits = {
        "login_attempts_per_minute": 4.0,
        "claim_attempts_per_minute": 3.0,
        "search_rate_per_minute": 2.0,
    }
    async with cluster(tmp_path, **limits) as (replicas, _, _):
        a, b, c = replicas
        customer = await a.customer()  # a successful sign-in uses up no attempt
        ep = await b.eligible_party()  # before the peer (127.0.0.1 for all) is cut off
        email = customer.account.email

        # Four wrong passwords spread over A, B and C use up the peer's four attempts ...
        for replica in (a, b, c, b):
            await expect_error(
                log_in(replica.channel, email, "wrong password 123"), UNAUTHENTICATED, "INVALID_CREDENTIALS"
            )
        # ... so a fifth anywhere is limited, even with the right password.
        for replica in (a, b, c):
            await expect_error(log_in(replica.channel, email, PASSWORD), LIMITED, "RATE_LIMITED")
        # The account's slow-down (after FREE_FAILURES) counted the failures made at the other replicas.
        assert await a.app.identity.login_throttle.delay(email.lower()) > 0

        # Wrong pairing codes for one instance, one at each replica: the fourth attempt is limited.
        await register(a, "limit-box")
        for replica in (b, c, a):
            via = as_client(replica, customer)
            await expect_error(
                via.instances.ClaimInstance(
                    instance_pb2.ClaimInstanceRequest(instance_id="limit-box", pairing_code="WRONG-CODE"),
                    metadata=via.metadata,
                ),
                grpc.StatusCode.PERMISSION_DENIED,
                "INVALID_PAIRING_CODE",
            )
        await expect_error(
            customer.instances.ClaimInstance(
                instance_pb2.ClaimInstanceRequest(instance_id="limit-box", pairing_code="CODE-limit-box"),
                metadata=customer.metadata,
            ),
            LIMITED,
            "RATE_LIMITED",
        )

        # Two searches per minute: one at A, one at B, and the third, at C, is limited.
        request = await create_request(ep)
        for replica in (a, b):
            await search(as_client(replica, ep), request.name, timeout=1.0)
        await expect_error(search(as_client(c, ep), request.name, timeout=1.0), LIMITED, "RATE_LIMITED")


async def test_right_pairing_codes_and_passwords_sent_at_once_are_not_refused(tmp_path: Path) -> None:
    """An installer claims nine devices at once through one replica, a backend signs nine users in at
    once: each attempt is counted before it is checked (database buckets of 3), but right ones give it
    back and those still waiting for a bucket wait for them instead of being refused."""
    async with cluster(tmp_path, claim_attempts_per_minute=3.0, login_attempts_per_minute=3.0) as (
        replicas,
        _,
        _,
    ):
        a = replicas[0]
        users = [await a.customer() for _ in range(9)]
        for i in range(9):
            await register(a, f"house-{i}")

        async def outcome(call: Any) -> str:
            try:
                await call
            except grpc.aio.AioRpcError as error:
                return str(error.code().name)
            return "OK"

        owner = users[0]
        claims = [
            owner.instances.ClaimInstance(
                instance_pb2.ClaimInstanceRequest(instance_id=f"house-{i}", pairing_code=f"CODE-house-{i}"),
                metadata=owner.metadata,
            )
            for i in range(9)
        ]
        assert await asyncio.gather(*(outcome(c) for c in claims)) == ["OK"] * 9
        logins = [log_in(a.channel, u.account.email, PASSWORD) for u in users]
        assert await asyncio.gather(*(outcome(c) for c in logins)) == ["OK"] * 9


async def test_a_database_bucket_is_taken_atomically_and_its_idle_rows_are_cleaned_up() -> None:
    """Twenty takes at once from five engines (as from five replicas): exactly the burst is allowed.
    A bucket that has refilled is deleted by the janitor, so the table does not grow."""
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
    async with fresh_schema() as schema:
        engines = [create_engine(POSTGRES_URL, schema=schema) for _ in range(5)]
        try:
            await migrate(engines[0])
            limiters = [DatabaseRateLimiter(create_sessionmaker(e), "t", 0.001, burst=5) for e in engines]
            taken = await asyncio.gather(*(limiters[i % 5].try_acquire("hot") for i in range(20)))
            assert sum(taken) == 5
            await limiters[0].refund("hot")  # one attempt given back: one more, and no more
            assert await limiters[1].try_acquire("hot") and not await limiters[2].try_acquire("hot")

            fast = DatabaseRateLimiter(create_sessionmaker(engines[0]), "fast", 6000.0)  # 100 per second
            await fast.acquire("a", "b")
            janitor = RateLimitJanitor(create_sessionmaker(engines[0]))
            await asyncio.sleep(0.1)  # both rows have refilled (1/100 s each)
            assert await janitor.delete_idle() == 2
            assert int(await postgres_execute(f"SELECT count(*) FROM {schema}.rate_limits")) == 1  # "hot"
        finally:
            for engine in engines:
                await engine.dispose()


# --- idempotency, refresh tokens and deletion across replicas ---


async def test_idempotency_refresh_reuse_and_deletion_hold_across_replicas(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (replicas, _, _):
        a, b, c = replicas

        # An idempotent create retried at another replica returns the first result.
        ep = await a.eligible_party()
        create = data_request_pb2.CreateDataRequestRequest(
            request_id=f"retry-{secrets.token_hex(4)}",
            data_request=data_request_pb2.DataRequest(
                title="Retried study", purpose="Research", data_need=data_need()
            ),
        )
        first = await ep.data_requests.CreateDataRequest(create, metadata=ep.metadata)
        via_b = as_client(b, ep)
        again = await via_b.data_requests.CreateDataRequest(create, metadata=via_b.metadata)
        assert again.name == first.name and again.create_time == first.create_time

        # A refresh token rotated at A is refused as reused at B, and the family is revoked (C).
        customer = await a.customer()
        rotated = await customer.identity.RefreshToken(
            identity_pb2.RefreshTokenRequest(refresh_token=customer.refresh_token)
        )
        await expect_error(
            b.client().identity.RefreshToken(
                identity_pb2.RefreshTokenRequest(refresh_token=customer.refresh_token)
            ),
            UNAUTHENTICATED,
            "REFRESH_TOKEN_REUSED",
        )
        await expect_error(
            c.client().identity.RefreshToken(
                identity_pb2.RefreshTokenRequest(refresh_token=rotated.refresh_token)
            ),
            UNAUTHENTICATED,
            "REFRESH_TOKEN_INVALID",
        )

        # DeleteAccount at A: B and C refuse the token at once, though they had just accepted it
        # (within their authentication cache's 2 s window, which alone would still accept it).
        leaving = await a.customer()
        on_b, on_c = as_client(b, leaving), as_client(c, leaving)
        assert await accepted(on_b) and await accepted(on_c)  # cached as a live account at B and C
        await leaving.identity.DeleteAccount(
            identity_pb2.DeleteAccountRequest(name=leaving.account.name), metadata=leaving.metadata
        )
        returned = time.monotonic()
        for session in (on_b, on_c):
            deadline = time.monotonic() + 0.5  # a NATS publish, far below the cache's window
            while await accepted(session):
                assert time.monotonic() < deadline, "a replica still accepted the deleted account's token"
                await asyncio.sleep(0.01)
        print(f"deletion refused at B and C {1000 * (time.monotonic() - returned):.1f} ms after it returned")
        await expect_error(me(on_b), UNAUTHENTICATED, "ACCOUNT_DISABLED")
