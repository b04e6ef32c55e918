"""The migrations build the schema the models declare (no drift), on SQLite and PostgreSQL.

A column or index declared in marketplace_server.db.models without a migration (or the other way
round) exists in a test database built from the models but not in a deployed one.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, String, column, insert, inspect, select, table, text
from sqlalchemy.ext.asyncio import AsyncEngine

from eddie.marketplace.v1 import data_request_pb2, identity_pb2
from marketplace_server.clock import utcnow
from marketplace_server.db import session as session_module
from marketplace_server.db.match_sets import matched_by_data_request, search_match_ids
from marketplace_server.db.models import (
    AccountRow,
    Base,
    DataRequestRow,
    PermissionRow,
    SearchMatchChunkRow,
    SearchRow,
)
from marketplace_server.db.session import alembic_config, create_engine, create_sessionmaker, migrate
from tests.support.postgres import (
    POSTGRES_URL,
    fresh_schema,
)


def _drift(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def _permission_indexes(connection: Connection) -> dict[str, list[str | None]]:
    return {i["name"] or "": i["column_names"] for i in inspect(connection).get_indexes("permissions")}


async def migrated_matches_the_models(engine: AsyncEngine) -> None:
    await migrate(engine)
    async with engine.connect() as conn:
        assert await conn.run_sync(_drift) == []
        indexes = await conn.run_sync(_permission_indexes)
    # The cluster's event repair asks for `update_time > now - REPAIR_LOOKBACK` every two seconds.
    assert indexes.get("ix_permissions_update_time") == ["update_time"], indexes
    await migrate(engine)  # a second start-up finds every migration applied
    async with engine.connect() as conn:
        assert list(await conn.execute(select(PermissionRow.id))) == []


async def test_the_migrated_sqlite_schema_matches_the_models(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'marketplace.db'}")
    try:
        await migrated_matches_the_models(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def pg_engine() -> AsyncIterator[AsyncEngine]:
    async with fresh_schema() as schema:
        engine = create_engine(POSTGRES_URL, schema=schema)
        try:
            yield engine
        finally:
            await engine.dispose()


@pytest.mark.postgres
async def test_the_migrated_postgres_schema_matches_the_models(pg_engine: AsyncEngine) -> None:
    await migrated_matches_the_models(pg_engine)


# --- 0010_search_match_chunks: the per-row matches move into chunks ---

BEFORE_CHUNKS = "0009_instance_bucket_index"
_OLD_MATCHES = table(
    "search_matches",
    column("search_id", String),
    column("instance_id", String),
    column("data_request_id", String),
)


def _alembic(connection: Connection, up: bool, revision: str) -> None:
    (command.upgrade if up else command.downgrade)(alembic_config(connection), revision)


async def _alembic_to(engine: AsyncEngine, revision: str, up: bool = True) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_alembic, up, revision)


async def moves_matches_into_chunks(engine: AsyncEngine) -> None:
    await _alembic_to(engine, BEFORE_CHUNKS)
    now = utcnow()
    # A broad search (three chunks), a narrow one, one that matched nothing; ids in no particular order,
    # some whose bytewise order differs from a locale's.
    broad = [f"m-{n:04d}" for n in range(2345)]
    narrow = ["b_1", "B-2", "b.3"]
    given = {"s-broad": broad, "s-narrow": narrow, "s-none": []}
    async with create_sessionmaker(engine).begin() as session:
        session.add(
            AccountRow(
                id="ep",
                email="ep@example.org",
                email_normalized="ep@example.org",
                display_name="EP",
                role=identity_pb2.ROLE_ELIGIBLE_PARTY,
                password_hash="x",
                create_time=now,
            )
        )
        await session.flush()
        session.add(
            DataRequestRow(
                id="dr",
                seq=1,
                kind=data_request_pb2.DataRequest.KIND_DATA_REQUEST,
                title="t",
                purpose="p",
                data_need=b"",
                energy_type=1,
                search_text="t",
                owner_id="ep",
                state=data_request_pb2.DataRequest.STATE_OPEN,
                create_time=now,
            )
        )
        await session.flush()
        for n, (search_id, ids) in enumerate(given.items()):
            session.add(
                SearchRow(
                    id=search_id,
                    data_request_id="dr",
                    create_time=now + timedelta(seconds=n),
                    queried=5000,
                    matched=len(ids),
                    not_matched=5000 - len(ids),
                    unreachable=0,
                    timed_out=0,
                    elapsed_ms=10,
                )
            )
        await session.flush()
        rows = [
            {"search_id": s, "instance_id": i, "data_request_id": "dr"}
            for s, ids in given.items()
            for i in ids
        ]
        random.Random(3).shuffle(rows)
        await session.execute(insert(_OLD_MATCHES), rows)

    await migrate(engine)
    async with engine.connect() as conn:
        assert not await conn.run_sync(lambda c: inspect(c).has_table("search_matches"))
        assert await conn.run_sync(_drift) == []
    async with create_sessionmaker(engine)() as session:
        chunks = (
            await session.execute(
                select(
                    SearchMatchChunkRow.search_id,
                    SearchMatchChunkRow.seq,
                    SearchMatchChunkRow.first_id,
                    SearchMatchChunkRow.last_id,
                    SearchMatchChunkRow.instance_ids,
                ).order_by(SearchMatchChunkRow.search_id, SearchMatchChunkRow.seq)
            )
        ).all()
        assert [(s, seq, first, last, len(text.split("\n"))) for s, seq, first, last, text in chunks] == [
            ("s-broad", 0, "m-0000", "m-0999", 1000),
            ("s-broad", 1, "m-1000", "m-1999", 1000),
            ("s-broad", 2, "m-2000", "m-2344", 345),
            ("s-narrow", 0, "B-2", "b_1", 3),
        ]
        for search_id, ids in given.items():
            assert await search_match_ids(session, search_id) == sorted(ids)
        asked = ["m-0000", "m-0999", "m-1000", "m-2344", "m-2345", "b.3", "b-3", "B-2"]
        assert await matched_by_data_request(session, "dr", asked) == {
            "m-0000",
            "m-0999",
            "m-1000",
            "m-2344",
            "b.3",
            "B-2",
        }

    # And back: the rows again, the data request from the search.
    await _alembic_to(engine, BEFORE_CHUNKS, up=False)
    async with engine.connect() as conn:
        back = (await conn.execute(select(_OLD_MATCHES))).all()
    assert sorted(back) == sorted((s, i, "dr") for s, ids in given.items() for i in ids)
    await migrate(engine)


async def test_sqlite_moves_search_matches_into_chunks(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'marketplace.db'}")
    try:
        await moves_matches_into_chunks(engine)
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_postgres_moves_search_matches_into_chunks(pg_engine: AsyncEngine) -> None:
    await moves_matches_into_chunks(pg_engine)
    # The bounds compare bytewise (the order the ids were sorted in), whatever the database's locale.
    async with pg_engine.connect() as conn:
        collations = await conn.execute(
            text(
                "SELECT column_name, collation_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'search_match_chunks' "
                "AND column_name IN ('first_id', 'last_id')"
            )
        )
        assert dict(collations.all()) == {"first_id": "C", "last_id": "C"}


# --- a start at every head reads alembic's table and nothing more ---


def test_the_scripts_heads_read_from_their_text_are_alembics() -> None:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert session_module.script_heads() == frozenset(heads)


@pytest.mark.parametrize(
    ("scripts", "heads"),
    [
        ({"a": 'revision = "a"\ndown_revision = None\n'}, {"a"}),
        (
            {
                "a": 'revision = "a"\ndown_revision = None\n',
                "b": 'revision: str = "b"\ndown_revision: str | None = "a"\n',
                "c": "revision = 'c'\ndown_revision = 'a'\n",
            },
            {"b", "c"},
        ),
        (
            {
                "a": 'revision = "a"\ndown_revision = None\n',
                "b": 'revision = "b"\ndown_revision = "a"\n',
                "c": 'revision = "c"\ndown_revision = "a"\n',
                "m": 'revision = "m"\ndown_revision = ("b", "c")\n',
            },
            {"m"},
        ),
        # What the reading does not understand leaves the decision to alembic.
        ({"a": 'revision = "a"\ndown_revision = None\ndepends_on = "x"\n'}, None),
        ({"a": "revision = make_id()\ndown_revision = None\n"}, None),
        ({"a": 'down_revision = "z"\n'}, None),
        ({"a": 'revision = "a"\ndown_revision = ["z"]\n'}, None),
        ({}, None),
    ],
)
def test_the_heads_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripts: dict[str, str], heads: set[str] | None
) -> None:
    (tmp_path / "versions").mkdir()
    for name, text_ in scripts.items():
        (tmp_path / "versions" / f"{name}.py").write_text(f'"""{name}"""\n\n{text_}')
    monkeypatch.setattr(session_module, "MIGRATIONS_DIR", tmp_path)
    assert session_module.script_heads() == (frozenset(heads) if heads is not None else None)


async def test_a_start_at_every_head_runs_no_migration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'marketplace.db'}")
    try:
        await migrate(engine)  # a new database: alembic builds it
        runs: list[str] = []
        real_upgrade = session_module._upgrade
        monkeypatch.setattr(session_module, "_upgrade", lambda connection: runs.append("upgrade"))
        await migrate(engine)
        assert runs == []  # at every head: only the version table was read
        # One revision behind: alembic runs again, and brings it to the heads.
        await _alembic_to(engine, BEFORE_CHUNKS, up=False)
        monkeypatch.setattr(session_module, "_upgrade", real_upgrade)
        await migrate(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(session_module._applied) == session_module.script_heads()
            assert await conn.run_sync(_drift) == []
    finally:
        await engine.dispose()
