"""Fixtures: a real marketplace on port 0, on SQLite or in a fresh PostgreSQL schema."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config
from tests.support.postgres import (
    POSTGRES_URL,
    fresh_schema,
    postgres_execute,
)


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
    async with fresh_schema() as schema:
        config = test_config(tmp_path, database_url=POSTGRES_URL, database_schema=schema)
        running = await start_marketplace(config)
        try:
            in_schema = f"SELECT to_regclass('{schema}.alembic_version') IS NOT NULL"
            assert await postgres_execute(in_schema), f"the marketplace's tables are not in schema {schema}"
            yield running
        finally:
            await running.close()
