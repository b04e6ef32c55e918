"""The shared PostgreSQL of the test machine: reachability, one-off statements, fresh schemas."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False


def postgres_dsn() -> str:
    """POSTGRES_URL for asyncpg itself (without SQLAlchemy's `+asyncpg`)."""
    return make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(hide_password=False)


async def postgres_execute(*statements: str) -> Any:
    """Runs `statements` on one connection; returns the first value of the last one's result."""
    connection = await asyncpg.connect(postgres_dsn(), timeout=5)
    try:
        result = None
        for statement in statements:
            result = await connection.fetchval(statement)
        return result
    finally:
        await connection.close()


def schema_name() -> str:
    """A fresh schema name `t_<random>`: the database is shared and persistent."""
    return f"t_{secrets.token_hex(8)}"


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[str]:
    """A fresh schema for one test, dropped after it; skips the test when PostgreSQL is unreachable
    or refuses to create it (any connection or permission problem means "no PostgreSQL here")."""
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
    schema = schema_name()
    try:
        await postgres_execute(f"CREATE SCHEMA {schema}")
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is not usable: {type(exc).__name__}: {exc}")
    try:
        yield schema
    finally:
        await postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
