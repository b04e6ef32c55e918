"""Engine, sessions and start-up migrations (SQLite by default, PostgreSQL optional)."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from eddie_common.logging import log_event

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

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


# `revision = "..."` and `down_revision = ...` (annotated or not) at the start of a line.
_REVISION_LINE = re.compile(r"^(revision|down_revision|depends_on)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", re.M)


def script_heads() -> frozenset[str] | None:
    """The head revisions of the migration scripts, read from the scripts' text without alembic
    (importing alembic and loading its script directory cost every start ~0.18 s); None when a
    script says something this reading does not understand (then alembic decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    try:
        for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
            found = {key: ast.literal_eval(value) for key, value in _REVISION_LINE.findall(path.read_text())}
            revision, down = found.get("revision"), found.get("down_revision")
            depends = found.get("depends_on")
            if not isinstance(revision, str) or depends is not None:
                return None
            downs = (down,) if isinstance(down, str) else down or ()
            if not isinstance(downs, tuple) or not all(isinstance(d, str) for d in downs):
                return None
            revisions.add(revision)
            parents.update(downs)
    except (OSError, ValueError, SyntaxError):
        return None
    heads = frozenset(revisions - parents)
    return heads or None


def _applied(connection: Connection) -> frozenset[str] | None:
    """The revisions the database is at (alembic's table), or None when it has none yet."""
    try:
        return frozenset(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
    except Exception:  # no such table (a new database): alembic creates it
        return None


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """alembic's configuration for the marketplace's migrations, run on `connection` if given."""
    # Imported here: only a start that has migrations to apply needs alembic.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    from alembic import command

    # "heads": independent branches (one per feature) apply side by side.
    command.upgrade(alembic_config(connection), "heads")


async def migrate(engine: AsyncEngine) -> None:
    """Applies every alembic migration up to head.

    A database already at every head (each restart) is only read: one query of alembic's version
    table against the scripts' heads. On PostgreSQL one process at a time migrates (a
    transaction-scoped advisory lock per schema): replicas starting at once on an empty database
    would otherwise create the same tables side by side.
    """
    heads = script_heads()
    if heads is not None:
        async with engine.connect() as conn:
            applied = await conn.run_sync(_applied)
        if applied == heads:
            log_event(log, "database_up_to_date", backend=engine.dialect.name, revisions=sorted(heads))
            return
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
