"""`bucket_claims`: the claimed instances per bucket, kept by triggers on `instances`.

A cluster search's coordinator reads these counts (`ClusterNode.snapshot`, at most 256 rows)
instead of every claimed instance id. Whatever writes `instances` (the services, a test's
INSERT, a DELETE by hand), the counts must equal a GROUP BY over the table. On PostgreSQL
(a fresh schema per test, skipped with a reason when unreachable) and on SQLite (which keeps
the counts too, though nothing in one process reads them).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import identity_pb2, instance_pb2
from eddie_client.client import Session
from marketplace_server.cluster.leases import BUCKETS, bucket_of
from marketplace_server.cluster.search import BucketSnapshot
from marketplace_server.db import buckets as db_buckets
from marketplace_server.db.instances import claimed_instances
from marketplace_server.db.models import (
    AccountRow,
    Base,
    BucketClaimRow,
    BucketLeaseRow,
    InstanceRow,
    PermissionRow,
    UtcDateTime,
)
from marketplace_server.db.session import alembic_config, create_engine, create_sessionmaker, migrate
from tests.cluster.test_replicas import as_client, create_request, search
from tests.support.access import SECRET
from tests.support.aiida_double import AiidaDouble, start_aiida
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config
from tests.support.postgres import (
    POSTGRES_URL,
    fresh_schema,
)

Counts = dict[int, int]
BEFORE = "0007_permission_update_time"  # the revision before 0008_bucket_claims


# --- the databases ---


@dataclass
class Database:
    """An empty database (not migrated): a SQLite file, or a fresh PostgreSQL schema."""

    url: str
    schema: str | None = None

    def engine(self) -> AsyncEngine:
        return create_engine(self.url, schema=self.schema)

    def overrides(self) -> dict[str, Any]:
        """A marketplace's Config on this database."""
        return {"database_url": self.url, "database_schema": self.schema}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        yield Database(f"sqlite+aiosqlite:///{tmp_path / 'bucket-claims.db'}")
        return
    async with fresh_schema() as schema:
        yield Database(POSTGRES_URL, schema)


@pytest.fixture
async def engine(database: Database) -> AsyncIterator[AsyncEngine]:
    created = database.engine()
    try:
        yield created
    finally:
        await created.dispose()


@pytest.fixture
async def pg_sessions() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A migrated fresh PostgreSQL schema (the concurrency tests need row locks)."""
    async with fresh_schema() as schema:
        pg = create_engine(POSTGRES_URL, schema=schema)
        try:
            await migrate(pg)
            yield create_sessionmaker(pg)
        finally:
            await pg.dispose()


# --- what is compared ---


async def stored_counts(sessions: async_sessionmaker[AsyncSession]) -> Counts:
    """`bucket_claims` as the snapshot reads it (buckets with claimed instances); none negative."""
    async with sessions() as session:
        rows = (await session.execute(select(BucketClaimRow.bucket, BucketClaimRow.claimed))).all()
    assert all(claimed >= 0 for _, claimed in rows), rows
    assert all(0 <= bucket < BUCKETS for bucket, _ in rows), rows
    return {int(b): int(c) for b, c in rows if c > 0}


async def grouped_counts(sessions: async_sessionmaker[AsyncSession]) -> Counts:
    """The claimed instances per stored bucket, counted by the database now (O(N))."""
    async with sessions() as session:
        rows = (
            await session.execute(
                select(InstanceRow.bucket, func.count())
                .where(InstanceRow.owner_id.is_not(None))
                .group_by(InstanceRow.bucket)
            )
        ).all()
    return {int(b): int(c) for b, c in rows}


async def hashed_counts(sessions: async_sessionmaker[AsyncSession]) -> Counts:
    """The claimed instances per bucket as the coordinator counted them before 0008: every id, hashed."""
    async with sessions() as session:
        ids = list(
            await session.scalars(select(InstanceRow.instance_id).where(InstanceRow.owner_id.is_not(None)))
        )
    return dict(Counter(bucket_of(i) for i in ids))


async def assert_counts(sessions: async_sessionmaker[AsyncSession], expected_total: int) -> Counts:
    counts = await stored_counts(sessions)
    assert counts == await grouped_counts(sessions)
    assert counts == await hashed_counts(sessions)
    assert sum(counts.values()) == expected_total
    return counts


async def assert_buckets_stored(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        rows = (await session.execute(select(InstanceRow.instance_id, InstanceRow.bucket))).all()
    wrong = [(i, b) for i, b in rows if b != bucket_of(i)]
    assert wrong == [], wrong[:5]
    return len(rows)


# --- rows ---

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def account(account_id: str) -> AccountRow:
    return AccountRow(
        id=account_id,
        email=f"{account_id}@example.org",
        email_normalized=f"{account_id}@example.org",
        display_name=account_id,
        role=identity_pb2.ROLE_CUSTOMER,
        password_hash="x",
        disabled=False,
        create_time=NOW,
    )


def instance_values(instance_id: str, owner: str | None = None) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "address": "127.0.0.1:1",
        "secret_hash": "0" * 64,
        "pairing_code_hash": "x",
        "owner_id": owner,
        "register_time": NOW,
        "claim_time": NOW if owner else None,
        "last_seen_time": NOW,
    }


def ids_in(bucket: int, count: int, prefix: str = "i") -> list[str]:
    """`count` instance ids that hash into `bucket`."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        candidate = f"{prefix}-{n}"
        if bucket_of(candidate) == bucket:
            found.append(candidate)
        n += 1
    return found


# --- tests ---


def test_the_stored_bucket_is_the_bucket_the_replicas_lease() -> None:
    assert bucket_of is db_buckets.bucket_of and db_buckets.BUCKETS == BUCKETS == 256
    ids = [f"aiida-{n}" for n in range(2000)] + [secrets.token_hex(16) for _ in range(2000)] + ["zähler-1"]
    # Stored buckets outlive versions: the formula (crc32 of the UTF-8 id, modulo 256) is pinned.
    assert [db_buckets.instance_bucket(i) for i in ids] == [zlib.crc32(i.encode()) % 256 for i in ids]


async def test_every_write_to_instances_keeps_the_counts(engine: AsyncEngine) -> None:
    await migrate(engine)
    sessions = create_sessionmaker(engine)
    await assert_counts(sessions, 0)
    async with sessions.begin() as session:
        session.add_all([account("alice"), account("bob")])
    # The ORM (the services' path): the model sets the bucket.
    async with sessions.begin() as session:
        session.add_all(InstanceRow(**instance_values(f"orm-{n}")) for n in range(40))
        session.add_all(InstanceRow(**instance_values(f"orm-owned-{n}", "alice")) for n in range(10))
    # Core: one multi-row INSERT, and an ORM bulk INSERT (a test's or a tool's paths), claimed rows
    # among them.
    core = [instance_values(f"core-{n}", "bob" if n % 3 == 0 else None) for n in range(30)]
    async with sessions.begin() as session:
        await session.execute(insert(Base.metadata.tables["instances"]).values(core[:15]))
        await session.execute(insert(InstanceRow), core[15:])
    assert await assert_buckets_stored(sessions) == 80
    await assert_counts(sessions, 10 + 10)

    async def change(statement: Any, total: int) -> None:
        async with sessions.begin() as session:
            await session.execute(statement)
        await assert_counts(sessions, total)

    orm = InstanceRow.instance_id.like("orm-%")
    # Claims (as InstanceService.claim: UPDATE ... WHERE owner_id IS NULL).
    claims = [f"orm-{n}" for n in range(0, 40, 2)]
    await change(
        update(InstanceRow)
        .where(InstanceRow.instance_id.in_(claims), InstanceRow.owner_id.is_(None))
        .values(owner_id="alice", claim_time=NOW),
        40,
    )
    # bob takes every orm- row: the 20 claimed ones change owner (no count), the 20 unclaimed count.
    # Then alice takes all of bob's (no count), and last_seen_time changes no count either.
    await change(update(InstanceRow).where(orm).values(owner_id="bob"), 40 + 20)
    await change(update(InstanceRow).where(InstanceRow.owner_id == "bob").values(owner_id="alice"), 60)
    await change(update(InstanceRow).values(last_seen_time=datetime.now(UTC)), 60)
    # Re-registration that resets the owner, and release (as the account deletion: owner to NULL).
    await change(update(InstanceRow).where(InstanceRow.instance_id == "orm-0").values(owner_id=None), 59)
    await change(update(InstanceRow).where(InstanceRow.instance_id.like("core-%")).values(owner_id=None), 49)
    # Deletes: claimed and unclaimed rows.
    await change(delete(InstanceRow).where(InstanceRow.instance_id.in_(["orm-1", "orm-2", "core-1"])), 47)
    await change(delete(InstanceRow).where(InstanceRow.owner_id.is_not(None)), 0)
    # Claimed again after the bucket's count fell to 0: the rows stay, and count up again.
    await change(update(InstanceRow).values(owner_id="bob"), await instance_count(sessions))


async def instance_count(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(InstanceRow)) or 0)


@pytest.mark.postgres
async def test_concurrent_claims_and_releases_lose_no_update(
    pg_sessions: async_sessionmaker[AsyncSession],
) -> None:
    sessions = pg_sessions
    # Two buckets, eight instances each: sixteen transactions on two counter rows at once.
    ids = ids_in(7, 8) + ids_in(200, 8)
    async with sessions.begin() as session:
        session.add(account("alice"))
        session.add_all(InstanceRow(**instance_values(i)) for i in ids)
    await assert_counts(sessions, 0)

    async def each_in_its_transaction(owner: str | None) -> None:
        started = asyncio.Barrier(len(ids))

        async def one(instance_id: str) -> None:
            async with sessions.begin() as session:
                await session.execute(
                    select(InstanceRow.owner_id).where(InstanceRow.instance_id == instance_id)
                )
                await started.wait()  # every transaction open (and has read) before any writes
                await session.execute(
                    update(InstanceRow).where(InstanceRow.instance_id == instance_id).values(owner_id=owner)
                )

        async with asyncio.timeout(30):
            await asyncio.gather(*(one(i) for i in ids))

    await each_in_its_transaction("alice")
    assert await assert_counts(sessions, 16) == {7: 8, 200: 8}
    await each_in_its_transaction(None)
    assert await assert_counts(sessions, 0) == {}
    await each_in_its_transaction("alice")
    assert await assert_counts(sessions, 16) == {7: 8, 200: 8}


def _upgrade_to(connection: sa.Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


async def test_the_migration_fills_bucket_and_counts_of_an_existing_database(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade_to, BEFORE)
    # Rows as a deployment before 0008 holds them: no bucket column. More than two backfill batches.
    before = sa.table(
        "instances",
        *(
            sa.column(name)
            for name in ("instance_id", "address", "secret_hash", "pairing_code_hash", "owner_id")
        ),
        *(sa.column(name, UtcDateTime()) for name in ("register_time", "claim_time", "last_seen_time")),
    )
    owners = ["alice", "bob", None]
    rows = [instance_values(f"old-{n:05d}", owners[n % 3]) for n in range(4500)]
    async with engine.begin() as conn:
        await conn.execute(
            insert(Base.metadata.tables["accounts"]), [account_values(a) for a in ("alice", "bob")]
        )
        await conn.execute(insert(before), rows)
        # A permission refers to an instance: the migration must not recreate `instances` (SQLite
        # could not drop the old table under the foreign key).
        await conn.execute(insert(Base.metadata.tables["accounts"]), [account_values("ep")])
        await conn.execute(insert(Base.metadata.tables["data_requests"]), [DATA_REQUEST])
        await conn.execute(insert(Base.metadata.tables["permissions"]), [PERMISSION])
    await migrate(engine)
    sessions = create_sessionmaker(engine)
    assert await assert_buckets_stored(sessions) == 4500
    async with sessions() as session:
        assert list(await session.scalars(select(PermissionRow.instance_id))) == ["old-00000"]
    counts = await assert_counts(sessions, 3000)
    assert len(counts) > 200  # 3,000 claimed ids spread over (almost) every bucket
    # The triggers are in place after the migration.
    async with sessions.begin() as session:
        await session.execute(
            update(InstanceRow).where(InstanceRow.owner_id.is_(None)).values(owner_id="bob")
        )
    await assert_counts(sessions, 4500)
    await migrate(engine)  # a second start-up changes nothing
    await assert_counts(sessions, 4500)


DATA_REQUEST = {
    "id": "dr",
    "seq": 1,
    "kind": 1,
    "title": "t",
    "description": "",
    "purpose": "p",
    "policy_uri": "",
    "data_need": b"",
    "energy_type": 1,
    "regions": "",
    "search_text": "t",
    "owner_id": "ep",
    "state": 1,
    "create_time": NOW,
    "close_time": None,
}
PERMISSION = {
    "id": "p",
    "seq": 1,
    "data_request_id": "dr",
    "instance_id": "old-00000",
    "eligible_party_id": "ep",
    "customer_id": "alice",
    "state": 1,
    "state_reason": "",
    "sink_uri": "grpc://127.0.0.1:1",
    "create_time": NOW,
    "decision_deadline": NOW,
    "decide_time": None,
    "start_time": None,
    "end_time": None,
    "update_time": NOW,
}


def account_values(account_id: str) -> dict[str, Any]:
    row = account(account_id)
    return {c.key: getattr(row, c.key) for c in AccountRow.__table__.columns}


async def test_claims_re_registrations_and_account_deletions_through_the_services_keep_the_counts(
    database: Database, tmp_path: Path
) -> None:
    config = test_config(tmp_path, claim_attempts_per_minute=10_000, **database.overrides())
    market = await start_marketplace(config)
    aiida = await start_aiida(AiidaDouble())
    try:
        sessions = market.app.sessions
        alice, bob = await market.customer(), await market.customer()
        ids = [f"svc-{n}" for n in range(24)]
        for instance_id in ids:
            await register(market, aiida.address, instance_id)
        await assert_counts(sessions, 0)
        for n, instance_id in enumerate(ids[:16]):
            await claim(alice if n % 2 else bob, instance_id)
        await assert_counts(sessions, 16)
        for instance_id in ids[:4] + ids[20:]:  # re-registrations of claimed and unclaimed instances
            await register(market, aiida.address, instance_id)
        await assert_counts(sessions, 16)
        await delete_account(alice)
        await assert_counts(sessions, 8)  # her eight instances unclaimed
        for instance_id in ids[1:16:2]:  # claimable again
            await claim(bob, instance_id)
        await assert_counts(sessions, 16)
        assert await assert_buckets_stored(sessions) == 24
    finally:
        await aiida.stop()
        await market.close(0.2)


async def delete_account(customer: Session) -> None:
    await customer.identity.DeleteAccount(
        identity_pb2.DeleteAccountRequest(name=customer.account.name), metadata=customer.metadata
    )


async def register(market: RunningMarketplace, address: str, instance_id: str) -> None:
    await market.client().instances.RegisterInstance(
        instance_pb2.RegisterInstanceRequest(
            instance_id=instance_id,
            address=address,
            instance_secret=SECRET,
            pairing_code=f"CODE-{instance_id}",
        )
    )


async def claim(customer: Session, instance_id: str) -> None:
    await customer.instances.ClaimInstance(
        instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=f"CODE-{instance_id}"),
        metadata=customer.metadata,
    )


# --- the snapshot of a cluster search (three replicas, PostgreSQL and NATS; see test_replicas) ---


async def old_snapshot(sessions: async_sessionmaker[AsyncSession]) -> dict[int, BucketSnapshot]:
    """`ClusterNode.snapshot` as it was before 0008: the leases, and every claimed id hashed."""
    async with sessions() as session:
        leases = (
            await session.execute(
                select(
                    BucketLeaseRow.bucket,
                    BucketLeaseRow.owner,
                    BucketLeaseRow.token,
                    BucketLeaseRow.expires_at > func.now(),
                )
            )
        ).all()
        claimed = await session.scalars(
            select(InstanceRow.instance_id).where(InstanceRow.owner_id.is_not(None))
        )
        counts = Counter(bucket_of(i) for i in claimed)
    return {
        int(bucket): BucketSnapshot(int(bucket), owner if live else None, int(token), counts[bucket])
        for bucket, owner, token, live in leases
        if counts[bucket]
    }


@pytest.mark.postgres
@pytest.mark.nats
async def test_the_snapshot_of_a_cluster_search_is_the_old_computation(
    replicas: list[RunningMarketplace],
) -> None:
    aiida = await start_aiida(AiidaDouble())
    try:
        first = replicas[0]
        customers = [await first.customer(), await first.customer()]
        ids = [f"snap-{secrets.token_hex(3)}-{n}" for n in range(30)]
        for n, instance_id in enumerate(ids):
            aiida.double.matches[instance_id] = n % 3 == 0
            await register(replicas[n % 3], aiida.address, instance_id)
            await claim(as_client(replicas[(n + 1) % 3], customers[n % 2]), instance_id)
        end = time.monotonic() + 20
        while sum(link.connected for r in replicas for link in r.app.manager.links.values()) < len(ids):
            assert time.monotonic() < end, "the claimed instances' streams never came up"
            await asyncio.sleep(0.05)

        async def snapshots_agree(claimed: int) -> None:
            for replica in replicas:
                cluster = replica.app.cluster
                assert cluster is not None
                new = await cluster.snapshot()
                assert new == await old_snapshot(cluster.sessions)
                assert sum(s.claimed for s in new.values()) == claimed

        await snapshots_agree(30)
        ep = await first.eligible_party()
        request = await create_request(ep)
        for replica in replicas:
            matched, summary = await search(as_client(replica, ep), request.name)
            assert summary.queried == 30 and summary.unreachable == 0 and summary.timed_out == 0
            assert sorted(matched) == sorted(ids[::3])
        await delete_account(as_client(replicas[2], customers[1]))
        await snapshots_agree(15)
    finally:
        await aiida.stop()


async def test_a_replica_reads_the_claimed_instances_of_its_own_buckets_only(engine: AsyncEngine) -> None:
    """The resync's read (`claimed_instances` with the held buckets) is the replica's share: exactly
    the claimed instances of those buckets, none of another bucket, no unclaimed one."""
    await migrate(engine)
    sessions = create_sessionmaker(engine)
    async with sessions.begin() as session:
        session.add(account("alice"))
    async with sessions.begin() as session:
        session.add_all(InstanceRow(**instance_values(f"own-{n}", "alice")) for n in range(300))
        session.add_all(InstanceRow(**instance_values(f"free-{n}")) for n in range(50))
    everyone = await claimed_instances(sessions)
    assert len(everyone) == 300
    held = {bucket_of(i) for i, _ in everyone[:40]}
    mine = await claimed_instances(sessions, held)
    assert {i for i, _ in mine} == {i for i, _ in everyone if bucket_of(i) in held}
    assert 0 < len(mine) < 300
    assert await claimed_instances(sessions, set()) == []
