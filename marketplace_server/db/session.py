"""Engine, sessions and start-up migrations (SQLite by default, PostgreSQL optional)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from eddie_common.logging import log_event

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}", re.ASCII)


def create_engine(url: str, schema: str | None = None) -> AsyncEngine:
    """An async engine; SQLite gets WAL, foreign keys and a busy timeout.

    `schema` (PostgreSQL only) puts every table in that existing schema by making
    it the connections' `search_path`, e.g. to share one database between tests.
    """
    backend = make_url(url).get_backend_name()
    if schema is not None and (backend != "postgresql" or not _SCHEMA_NAME.fullmatch(schema)):
        raise ValueError("a database schema needs PostgreSQL and a lower-case identifier")
    if backend == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    connect_args: dict[str, Any] = {}
    if schema is not None:
        # asyncpg takes run-time parameters as server_settings (libpq's `options` is not supported).
        connect_args["server_settings"] = {"search_path": schema}
    return create_async_engine(
        url,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=5,
        connect_args=connect_args,
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _upgrade(connection: Connection) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "heads")  # independent branches (one per feature) apply side by side


async def migrate(engine: AsyncEngine) -> None:
    """Applies every alembic migration up to head.

    On PostgreSQL one process at a time (a transaction-scoped advisory lock per schema): replicas
    starting at once on an empty database would otherwise create the same tables side by side.
    """
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(
                text(
                    "SELECT pg_advisory_xact_lock(hashtext('eddie-migrate:' || "
                    "coalesce(current_schema(), '')))"
                )
            )
        await conn.run_sync(_upgrade)
    log_event(log, "database_migrated", backend=engine.dialect.name)
