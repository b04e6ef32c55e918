"""Fixtures: a real marketplace on port 0, on SQLite or in a fresh PostgreSQL schema."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config
from tests.support.postgres import POSTGRES_URL, postgres_execute, postgres_reachable, schema_name


@pytest.fixture
async def marketplace(tmp_path: Path) -> AsyncIterator[RunningMarketplace]:
    running = await start_marketplace(test_config(tmp_path))
    yield running
    await running.close()


@pytest.fixture
async def pg_marketplace(tmp_path: Path) -> AsyncIterator[RunningMarketplace]:
    """A marketplace on PostgreSQL (POSTGRES_URL) in a fresh schema, dropped afterwards.

    The database is shared and persistent, so every test gets its own schema
    `t_<random>` (the server's connections use it as their search_path).
    Mark tests using it with `pytest.mark.postgres`.
    """
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
    schema = schema_name()
    try:
        await postgres_execute(f"CREATE SCHEMA {schema}")
    except Exception as exc:  # any connection or permission problem means "no PostgreSQL here"
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is not usable: {type(exc).__name__}: {exc}")
    try:
        config = test_config(tmp_path, database_url=POSTGRES_URL, database_schema=schema)
        running = await start_marketplace(config)
        try:
            in_schema = f"SELECT to_regclass('{schema}.alembic_version') IS NOT NULL"
            assert await postgres_execute(in_schema), f"the marketplace's tables are not in schema {schema}"
            yield running
        finally:
            await running.close()
    finally:
        await postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
