"""One live permission per (data request, instance), also under concurrent RequestAccess calls.

API.md (RequestAccess): an instance that already has a live (PENDING, ACCEPTED or
ACTIVE) permission for that data request gets that permission back, not a second
one. A check-then-insert alone lets two concurrent calls both insert; the partial
unique index `ux_permissions_live` lets one win, and the loser returns the winner's
permission. The migration that adds the index ends duplicates already stored.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, column, insert, select, table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from eddie.marketplace.v1 import access_pb2
from marketplace_server.db.models import (
    AccountRow,
    DataRequestRow,
    OutboxRow,
    PermissionRow,
    PermissionTransitionRow,
    UtcDateTime,
)
from marketplace_server.db.session import alembic_config, create_engine, create_sessionmaker, migrate
from tests.support.access import Permission, Scene, aiida, market, matched_scene
from tests.support.aiida_double import RunningAiida
from tests.support.marketplace import RunningMarketplace
from tests.support.postgres import POSTGRES_URL, postgres_execute, postgres_reachable, schema_name

__all__ = ["aiida", "market"]  # fixtures

LIVE = (Permission.STATE_PENDING, Permission.STATE_ACCEPTED, Permission.STATE_ACTIVE)
STORM = 10


async def _all_permissions(scene: Scene) -> list[Any]:
    response = await scene.ep.access.ListPermissions(
        access_pb2.ListPermissionsRequest(data_request=scene.data_request.name, page_size=1000),
        metadata=scene.ep.metadata,
    )
    return list(response.permissions)


async def _storm(scene: Scene, batches: list[list[str]], request_ids: list[str]) -> list[list[Any]]:
    """STORM RequestAccess calls at once; each call's permissions, in its instances' order."""
    calls = [
        scene.request_access(*batch, request_id=request_id)
        for batch, request_id in zip(batches, request_ids, strict=True)
    ]
    return list(await asyncio.gather(*calls))


def _assert_one_live_each(
    ids: list[str], batches: list[list[str]], results: list[list[Any]], stored: list[Any]
) -> dict[str, str]:
    """Exactly one live permission per instance is stored, and every caller got that one."""
    live = [p for p in stored if p.state in LIVE]
    by_instance: dict[str, list[str]] = {}
    for permission in live:
        by_instance.setdefault(permission.instance_id, []).append(permission.name)
    assert sorted(by_instance) == sorted(ids)
    assert all(len(names) == 1 for names in by_instance.values()), f"duplicates: {by_instance}"
    assert len(stored) == len(ids), "no permission was created and then ended by the race"
    winners = {instance_id: names[0] for instance_id, names in by_instance.items()}
    for batch, permissions in zip(batches, results, strict=True):
        assert [p.instance_id for p in permissions] == batch
        assert [p.name for p in permissions] == [winners[i] for i in batch]
    return winners


async def storm_of_one_instance(scene: Scene, ids: list[str]) -> None:
    [instance_id] = ids
    batches = [[instance_id]] * STORM
    # Without request ids, with distinct ones, and with one request id used twice (a client retry).
    request_ids = ["", "", "", "storm-a", "storm-b", "storm-c", "storm-c", "", "storm-d", ""]
    results = await _storm(scene, batches, request_ids)
    _assert_one_live_each(ids, batches, results, await _all_permissions(scene))


async def storm_of_overlapping_batches(scene: Scene, ids: list[str]) -> None:
    a, b, c, d = ids
    batches = [[a, b], [b, c], [c, d], [d, a], [a, b, c, d], [d, c, b, a], [b], [c, a], [a, b, c], [d]]
    request_ids = [f"batch-{i}" if i % 3 == 0 else "" for i in range(STORM)]
    results = await _storm(scene, batches, request_ids)
    winners = _assert_one_live_each(ids, batches, results, await _all_permissions(scene))
    # A later call, batch or not, still gets the same ones back.
    again = await scene.request_access(d, b, a, c)
    assert [p.name for p in again] == [winners[i] for i in (d, b, a, c)]


async def test_a_storm_of_requests_for_one_instance_leaves_one_live_permission(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1)
    await storm_of_one_instance(scene, ids)


async def test_a_storm_of_overlapping_batches_gets_each_instance_its_one_permission(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=4)
    await storm_of_overlapping_batches(scene, ids)


async def test_after_the_live_permission_ends_a_storm_creates_exactly_one_new_one(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1)
    [first] = await scene.request_access(*ids)
    await scene.decide(first, approve=False)
    results = await _storm(scene, [ids] * STORM, [""] * STORM)
    names = {permissions[0].name for permissions in results}
    assert len(names) == 1 and first.name not in names
    stored = await _all_permissions(scene)
    assert sorted((p.name, p.state) for p in stored) == sorted(
        [(first.name, Permission.STATE_REJECTED), (names.pop(), Permission.STATE_PENDING)]
    )


async def test_the_database_refuses_a_second_live_permission(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    """The index itself, below the service: a direct second insert of a live row fails; an ended one may."""
    scene, ids = await matched_scene(market, aiida, instances=1)
    [permission] = await scene.request_access(*ids)
    sessions = market.app.sessions
    async with sessions() as session:
        row = await session.get(PermissionRow, permission.name.removeprefix("permissions/"))
        assert row is not None
        template = {c.key: getattr(row, c.key) for c in PermissionRow.__table__.columns}
    with pytest.raises(IntegrityError):
        async with sessions.begin() as session:
            session.add(PermissionRow(**{**template, "id": "second-live", "seq": 10_000}))
    async with sessions.begin() as session:  # an ended permission beside the live one is fine
        session.add(
            PermissionRow(**{**template, "id": "ended", "seq": 10_001, "state": Permission.STATE_REJECTED})
        )


# --- the migration, on a database that already holds duplicates ---


def _upgrade(connection: Connection, target: str) -> None:
    command.upgrade(alembic_config(connection), target)


async def _upgrade_to(engine: AsyncEngine, *targets: str) -> None:
    async with engine.begin() as conn:
        for target in targets:
            await conn.run_sync(_upgrade, target)


BEFORE_INDEX = ("0002", "0003", "0005")  # the heads before 0006_one_live_permission
T0 = datetime(2026, 12, 1, tzinfo=UTC)
_seq = itertools.count(1)


def _permission(permission_id: str, data_request: str, instance: str, state: int) -> PermissionRow:
    return PermissionRow(
        id=permission_id,
        seq=next(_seq),
        data_request_id=data_request,
        instance_id=instance,
        eligible_party_id="ep",
        customer_id="customer",
        state=state,
        state_reason="",
        sink_uri="grpc://127.0.0.1:1",
        create_time=T0,
        decision_deadline=T0 + timedelta(days=7),
        decide_time=None,
        start_time=None,
        end_time=None,
        update_time=T0,
    )


INSTANCES_BEFORE_INDEX = table(
    "instances",
    *(column(name) for name in ("instance_id", "address", "secret_hash", "pairing_code_hash", "owner_id")),
    *(column(name, UtcDateTime()) for name in ("register_time", "claim_time", "last_seen_time")),
)


async def migration_ends_duplicates(engine: AsyncEngine) -> None:
    await _upgrade_to(engine, *BEFORE_INDEX)
    sessions = create_sessionmaker(engine)
    async with sessions.begin() as session:
        for account_id, role in (("ep", 2), ("customer", 1)):
            session.add(
                AccountRow(
                    id=account_id,
                    email=f"{account_id}@example.org",
                    email_normalized=f"{account_id}@example.org",
                    display_name=account_id,
                    role=role,
                    password_hash="x",
                    create_time=T0,
                )
            )
        await session.flush()
        for n, data_request in enumerate(("dr1", "dr2")):
            session.add(
                DataRequestRow(
                    id=data_request,
                    seq=n + 1,
                    kind=1,
                    title="t",
                    purpose="p",
                    data_need=b"",
                    energy_type=1,
                    search_text="t",
                    owner_id="ep",
                    state=1,
                    create_time=T0,
                )
            )
        await session.flush()
        # The instances table as it was before the index (the model has columns of later revisions).
        await session.execute(
            insert(INSTANCES_BEFORE_INDEX),
            [
                {
                    "instance_id": instance,
                    "address": "127.0.0.1:1",
                    "secret_hash": "x",
                    "pairing_code_hash": "x",
                    "owner_id": "customer",
                    "register_time": T0,
                    "claim_time": T0,
                    "last_seen_time": T0,
                }
                for instance in ("i1", "i2", "i3")
            ],
        )
        S = Permission
        rows = [
            # i1 / dr1: three pending duplicates; the newest stays.
            _permission("p-old", "dr1", "i1", S.STATE_PENDING),
            _permission("p-mid", "dr1", "i1", S.STATE_PENDING),
            _permission("p-new", "dr1", "i1", S.STATE_PENDING),
            # i2 / dr1: an active one (data flowing) and a newer pending one: the active one stays.
            _permission("a-active", "dr1", "i2", S.STATE_ACTIVE),
            _permission("a-pending", "dr1", "i2", S.STATE_PENDING),
            # i2 / dr1 also has ended permissions, which are not touched.
            _permission("a-rejected", "dr1", "i2", S.STATE_REJECTED),
            # i3 / dr1: two accepted ones; the older one's configure was not delivered yet.
            _permission("b-accepted-old", "dr1", "i3", S.STATE_ACCEPTED),
            _permission("b-accepted-new", "dr1", "i3", S.STATE_ACCEPTED),
            # i1 / dr2: one live permission of another data request, no duplicate.
            _permission("c-single", "dr2", "i1", S.STATE_PENDING),
        ]
        session.add_all(rows)
        await session.flush()
        session.add(
            OutboxRow(
                permission_id="b-accepted-old",
                instance_id="i3",
                kind="configure",
                payload={},
                attempts=0,
                next_attempt_time=T0,
                last_error="",
                done=False,
                create_time=T0,
            )
        )

    await migrate(engine)  # the start-up migration: up to every head

    async with sessions() as session:
        states = dict((await session.execute(select(PermissionRow.id, PermissionRow.state))).all())
        reasons = dict((await session.execute(select(PermissionRow.id, PermissionRow.state_reason))).all())
        transitions = (
            await session.execute(
                select(
                    PermissionTransitionRow.permission_id,
                    PermissionTransitionRow.from_state,
                    PermissionTransitionRow.to_state,
                )
            )
        ).all()
        outbox = (
            await session.execute(
                select(OutboxRow.permission_id, OutboxRow.kind, OutboxRow.done, OutboxRow.payload).order_by(
                    OutboxRow.id
                )
            )
        ).all()
    S = Permission
    assert states == {
        "p-old": S.STATE_TERMINATED,
        "p-mid": S.STATE_TERMINATED,
        "p-new": S.STATE_PENDING,
        "a-active": S.STATE_ACTIVE,
        "a-pending": S.STATE_TERMINATED,
        "a-rejected": S.STATE_REJECTED,
        "b-accepted-old": S.STATE_TERMINATED,
        "b-accepted-new": S.STATE_ACCEPTED,
        "c-single": S.STATE_PENDING,
    }
    assert "permissions/p-new" in reasons["p-old"] and "duplicate" in reasons["p-old"]
    assert "permissions/a-active" in reasons["a-pending"]
    assert sorted(transitions) == sorted(
        [
            ("p-old", S.STATE_PENDING, S.STATE_TERMINATED),
            ("p-mid", S.STATE_PENDING, S.STATE_TERMINATED),
            ("a-pending", S.STATE_PENDING, S.STATE_TERMINATED),
            ("b-accepted-old", S.STATE_ACCEPTED, S.STATE_TERMINATED),
        ]
    )
    # The AIIDA of the ended accepted one is told (revoke), and its configure is never sent.
    assert [(p, k, d) for p, k, d, _ in outbox] == [
        ("b-accepted-old", "configure", True),
        ("b-accepted-old", "revoke", False),
    ]
    assert "permissions/b-accepted-new" in outbox[1][3]["reason"]
    # From now on the database itself refuses a second live permission.
    with pytest.raises(IntegrityError):
        async with sessions.begin() as session:
            session.add(_permission("p-again", "dr1", "i1", S.STATE_PENDING))
    async with sessions.begin() as session:
        session.add(_permission("p-other", "dr2", "i2", S.STATE_PENDING))


async def test_the_migration_ends_stored_duplicates_on_sqlite(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    try:
        await migration_ends_duplicates(engine)
    finally:
        await engine.dispose()


# --- PostgreSQL: READ COMMITTED and row locks, where races differ most ---


@pytest.fixture
async def pg_engine() -> AsyncIterator[AsyncEngine]:
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
    schema = schema_name()
    await postgres_execute(f"CREATE SCHEMA {schema}")
    engine = create_engine(POSTGRES_URL, schema=schema)
    try:
        yield engine
    finally:
        await engine.dispose()
        await postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.mark.postgres
async def test_the_migration_ends_stored_duplicates_on_postgres(pg_engine: AsyncEngine) -> None:
    await migration_ends_duplicates(pg_engine)


@pytest.mark.postgres
async def test_a_storm_for_one_instance_on_postgres(
    pg_marketplace: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(pg_marketplace, aiida, instances=1)
    await storm_of_one_instance(scene, ids)


@pytest.mark.postgres
async def test_a_storm_of_overlapping_batches_on_postgres(
    pg_marketplace: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(pg_marketplace, aiida, instances=4)
    await storm_of_overlapping_batches(scene, ids)
