"""The migrations build the schema the models declare (no drift), on SQLite and PostgreSQL.

A column or index declared in marketplace_server.db.models without a migration (or the other way
round) exists in a test database built from the models but not in a deployed one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from marketplace_server.db.models import Base, PermissionRow
from marketplace_server.db.session import create_engine, migrate
from tests.support.postgres import POSTGRES_URL, postgres_execute, postgres_reachable, schema_name


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
async def test_the_migrated_postgres_schema_matches_the_models(pg_engine: AsyncEngine) -> None:
    await migrated_matches_the_models(pg_engine)
