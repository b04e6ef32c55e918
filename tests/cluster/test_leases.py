"""Bucket leases among replicas on a real PostgreSQL: even spread, takeover, fencing, handover."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from marketplace_server.cluster.leases import LeaseKeeper, LeaseLost, assert_lease, bucket_of
from marketplace_server.db.models import BucketLeaseRow, ReplicaRow
from marketplace_server.db.session import create_engine, create_sessionmaker, migrate
from tests.support.postgres import POSTGRES_URL, fresh_schema

pytestmark = pytest.mark.postgres
BUCKETS = 12


@pytest.fixture
async def sessions() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with fresh_schema() as schema:
        engine = create_engine(POSTGRES_URL, schema=schema)
        try:
            await migrate(engine)
            yield create_sessionmaker(engine)
        finally:
            await engine.dispose()


def keeper(sessions: async_sessionmaker[AsyncSession], name: str) -> LeaseKeeper:
    return LeaseKeeper(sessions, name, buckets=BUCKETS, lease_seconds=1.5, renew_seconds=0.25)


async def settle(keepers: list[LeaseKeeper], rounds: int = 3) -> None:
    for _ in range(rounds):
        for k in keepers:
            await k.tick()


def owners(keepers: list[LeaseKeeper]) -> dict[int, list[str]]:
    held: dict[int, list[str]] = {}
    for k in keepers:
        for bucket in k.held:
            held.setdefault(bucket, []).append(k.replica_id)
    return held


async def test_buckets_spread_evenly_and_each_has_exactly_one_owner(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    keepers = [keeper(sessions, f"r{i}") for i in range(3)]
    for k in keepers:
        await k._seed()
    await settle(keepers)
    held = owners(keepers)
    assert sorted(held) == list(range(BUCKETS))
    assert all(len(v) == 1 for v in held.values())
    assert sorted(len(k.held) for k in keepers) == [4, 4, 4]


async def test_a_joining_replica_gets_its_share_handed_over(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    first = keeper(sessions, "first")
    await first._seed()
    await first.tick()
    assert len(first.held) == BUCKETS
    second = keeper(sessions, "second")
    await settle([second, first, second])
    assert sorted((len(first.held), len(second.held))) == [6, 6]
    assert all(len(v) == 1 for v in owners([first, second]).values())


async def test_a_dead_replicas_buckets_are_taken_over_with_a_new_token(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    alive, dead = keeper(sessions, "alive"), keeper(sessions, "dead")
    await alive._seed()
    await settle([alive, dead])
    taken = dict(dead.held)
    assert taken
    await asyncio.sleep(1.7)  # the dead replica never renews: its leases and heartbeat expire
    await alive.tick()
    await alive.tick()
    assert len(alive.held) == BUCKETS
    for bucket, token in taken.items():
        assert alive.held[bucket] == token + 1  # every takeover increases the fencing token
    bucket = next(iter(taken))
    async with sessions.begin() as session:  # the dead replica's writes are fenced off
        with pytest.raises(LeaseLost):
            await assert_lease(session, bucket, "dead", taken[bucket])


async def test_a_replica_learns_at_its_next_renewal_that_a_bucket_was_taken(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    lost: list[int] = []
    k = keeper(sessions, "victim")
    k.on_lost.append(lambda bucket, token: lost.append(bucket))
    await k._seed()
    await k.tick()
    async with sessions.begin() as session:  # another replica took bucket 3 (its lease had expired)
        await session.execute(
            update(BucketLeaseRow)
            .where(BucketLeaseRow.bucket == 3)
            .values(owner="thief", token=BucketLeaseRow.token + 1)
        )
    await k.tick()
    assert 3 in lost
    assert not k.owns(3)


async def test_a_replica_that_cannot_renew_fences_itself(sessions: async_sessionmaker[AsyncSession]) -> None:
    lost: list[int] = []
    k = keeper(sessions, "cut-off")
    k.on_lost.append(lambda bucket, token: lost.append(bucket))
    await k._seed()
    await k.tick()
    assert len(k.held) == BUCKETS
    k._renewed_at -= 10  # as if every renewal for the last 10 s had failed
    k._fence_if_stale()
    assert k.held == {}
    assert sorted(lost) == list(range(BUCKETS))


async def test_a_graceful_stop_hands_every_bucket_over_at_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    leaving, staying = keeper(sessions, "leaving"), keeper(sessions, "staying")
    await leaving.start()
    await staying.start()
    await settle([leaving, staying])
    assert leaving.held
    await leaving.stop()
    await staying.tick()  # no expiry to wait for
    await staying.tick()
    assert len(staying.held) == BUCKETS
    await staying.stop()
    async with sessions() as session:
        owner_left = await session.scalar(
            select(BucketLeaseRow.owner).where(BucketLeaseRow.owner.is_not(None))
        )
    assert owner_left is None


async def live_leases(sessions: async_sessionmaker[AsyncSession]) -> dict[int, tuple[str, int]]:
    """bucket -> (owner, token) of every live lease, as the database has them."""
    async with sessions() as session:
        rows = await session.execute(
            select(BucketLeaseRow.bucket, BucketLeaseRow.owner, BucketLeaseRow.token).where(
                BucketLeaseRow.owner.is_not(None), BucketLeaseRow.expires_at > func.now()
            )
        )
        return {int(b): (str(o), int(t)) for b, o, t in rows.all()}


async def heartbeat_live(sessions: async_sessionmaker[AsyncSession], replica: str) -> bool:
    async with sessions() as session:
        found = await session.scalar(
            select(ReplicaRow.id).where(ReplicaRow.id == replica, ReplicaRow.expires_at > func.now())
        )
    return found is not None


async def test_expiring_a_gone_replica_frees_exactly_its_live_leases_and_heartbeat(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """What a node does when NATS says no one serves a replica: the others take its buckets at their
    next round, with a new token, without waiting for the lease to run out."""
    gone, a, b = keeper(sessions, "gone"), keeper(sessions, "a"), keeper(sessions, "b")
    await gone._seed()
    await settle([gone, a, b])
    taken = dict(gone.held)
    assert len(taken) == 4
    before = await live_leases(sessions)
    assert await heartbeat_live(sessions, "gone")

    assert await a.expire_replica("gone") == len(taken)
    after = await live_leases(sessions)
    assert sorted(set(before) - set(after)) == sorted(taken), "exactly its buckets are no longer live"
    assert {k: v for k, v in before.items() if k not in taken} == after, "the others' leases untouched"
    assert not await heartbeat_live(sessions, "gone")
    assert await heartbeat_live(sessions, "a") and await heartbeat_live(sessions, "b")
    assert await b.expire_replica("gone") == 0, "nothing of it is live any more"
    with pytest.raises(ValueError, match="own leases"):
        await a.expire_replica("a")

    await a.tick()  # two live replicas: a share of 6 each, taken from the expired buckets
    await b.tick()
    assert len(a.held) == len(b.held) == BUCKETS // 2
    for bucket, token in taken.items():
        holder = a if bucket in a.held else b
        assert holder.held[bucket] == token + 1, "a takeover increases the fencing token"
    bucket = next(iter(taken))
    async with sessions.begin() as session:
        with pytest.raises(LeaseLost):
            await assert_lease(session, bucket, "gone", taken[bucket])

    lost: list[int] = []  # alive after all: its next round finds every bucket taken
    gone.on_lost.append(lambda bucket, token: lost.append(bucket))
    await gone.tick()
    assert sorted(lost) == sorted(taken) and gone.held == {}
    assert all(len(v) == 1 for v in owners([gone, a, b]).values())


async def test_a_replica_wrongly_thought_gone_renews_what_nobody_took_under_the_same_token(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The choice in `expire_replica`: an expired lease no one took is renewed by its owner's next
    round (the token never changed, so no one else acted for it); until then its writes are fenced."""
    alive, other = keeper(sessions, "alive"), keeper(sessions, "other")
    await alive._seed()
    await settle([alive, other])
    held = dict(alive.held)
    assert len(held) == BUCKETS // 2
    assert await other.expire_replica("alive") == len(held)
    bucket = next(iter(held))
    async with sessions.begin() as session:
        with pytest.raises(LeaseLost):
            await assert_lease(session, bucket, "alive", held[bucket])
    await alive.tick()  # before `other` ran a round
    assert alive.held == held
    async with sessions.begin() as session:
        await assert_lease(session, bucket, "alive", held[bucket])
    await other.tick()
    assert len(other.held) == BUCKETS // 2 and all(len(v) == 1 for v in owners([alive, other]).values())


def test_an_instance_always_hashes_to_the_same_bucket() -> None:
    assert bucket_of("aiida-fleet-7") == bucket_of("aiida-fleet-7")
    assert {bucket_of(f"i-{n}", 16) for n in range(500)} == set(range(16))


async def test_a_poke_runs_a_round_at_once_so_a_leaving_replicas_buckets_move_without_waiting(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """What `{prefix}.rebalance` does: the remaining replicas take the released buckets on the poke,
    not at their next renewal (an hour away here)."""
    stays, leaves = (
        LeaseKeeper(sessions, name, buckets=BUCKETS, lease_seconds=7200, renew_seconds=3600)
        for name in ("stays", "leaves")
    )
    await stays.start()
    await leaves.start()
    await stays.tick()  # both live now: stays gives up half of its buckets, leaves takes them
    await leaves.tick()
    assert sorted((len(stays.held), len(leaves.held))) == [6, 6]
    try:
        await leaves.stop()  # the handover: every lease released at once
        stays.poke()
        for _ in range(200):
            if len(stays.held) == BUCKETS:
                break
            await asyncio.sleep(0.01)
        assert len(stays.held) == BUCKETS, "the poke should have run a round"
    finally:
        await stays.stop()
