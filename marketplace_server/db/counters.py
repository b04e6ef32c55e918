"""Named monotonic counters for `seq` columns, safe under concurrent transactions."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from marketplace_server.db.models import CounterRow

__all__ = ["next_value", "reserve"]


async def next_value(session: AsyncSession, name: str) -> int:
    """Increments counter `name` (created at 1 on first use) and returns its new value.

    One atomic upsert: `INSERT ... ON CONFLICT (name) DO UPDATE SET value = value + 1
    RETURNING value`. It holds the counter's row lock (PostgreSQL) or the write lock
    (SQLite) until the caller's transaction ends, so values are unique and rows
    become visible in value order: keyset paging never sees a newer row appear
    below a cursor.
    """
    dialect = session.get_bind().dialect.name
    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(CounterRow)
        .values(name=name, value=1)
        .on_conflict_do_update(index_elements=[CounterRow.name], set_={"value": CounterRow.value + 1})
        .returning(CounterRow.value)
    )
    value = (await session.execute(statement)).scalar_one()
    return int(value)


async def reserve(session: AsyncSession, name: str, count: int) -> int:
    """Reserves `count` consecutive values of counter `name` in one statement; returns the first.

    The same atomic upsert as `next_value`, incremented by `count` (for bulk inserts).
    """
    if count < 1:
        raise ValueError("count must be positive")
    dialect = session.get_bind().dialect.name
    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(CounterRow)
        .values(name=name, value=count)
        .on_conflict_do_update(index_elements=[CounterRow.name], set_={"value": CounterRow.value + count})
        .returning(CounterRow.value)
    )
    last = int((await session.execute(statement)).scalar_one())
    return last - count + 1
