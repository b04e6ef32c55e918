"""SQLite storage of readings and of the permissions they arrived under.

One aiosqlite connection in WAL mode writes; an asyncio lock keeps each
transaction whole. A second, read-only connection serves the listings.
Readings are keyed by (permission_id, data_tag, time_ns) and inserted with
INSERT OR IGNORE, so at-least-once delivery stores each reading once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import aiosqlite

from eddie_sink.readings import StoredReading

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    permission_id TEXT NOT NULL,
    data_tag TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    value REAL NOT NULL,
    unit TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (permission_id, data_tag, time_ns)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_by_time ON readings (permission_id, time_ns, data_tag);
CREATE TABLE IF NOT EXISTS permissions (
    permission_id TEXT PRIMARY KEY,
    eligible_party TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    first_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS permission_ends (
    permission_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    ended_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS permission_watches (
    permission_id TEXT PRIMARY KEY,
    sink_token TEXT NOT NULL,
    end_ns INTEGER
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""
# 6 bound parameters per row, well below SQLite's limit of 32,766 per statement.
_ROWS_PER_STATEMENT = 500
_COLUMNS = "permission_id, data_tag, time_ns, value, unit"
RECORDED_CACHE_SIZE = 100_000


class ReadingStore:
    """The sink's database; every method is one transaction."""

    def __init__(
        self,
        connection: aiosqlite.Connection,
        jsonl: IO[str] | None,
        reader: aiosqlite.Connection | None = None,
    ) -> None:
        self._db = connection
        # Reads (ListReadings) go to a connection of their own: in WAL mode they see the last commit
        # without waiting for the writer's or the Publish streams' turns on the lock.
        self._reader = reader or connection
        self._jsonl = jsonl
        self._lock = asyncio.Lock()
        self._recorded: OrderedDict[str, None] = OrderedDict()  # permissions known to be recorded
        self._unrecorded: dict[str, tuple[str, str]] = {}  # waiting for the next permission transaction
        self._recording: asyncio.Future[None] | None = None  # that transaction's outcome
        self._in_flight: dict[str, tuple[str, str]] = {}  # being written by the current one

    @classmethod
    async def open(cls, path: Path, jsonl: Path | None = None) -> ReadingStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = await aiosqlite.connect(path, isolation_level=None)
        try:
            await connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a reading acknowledged to an AIIDA survives a power loss.
            await connection.execute("PRAGMA synchronous=FULL")
            await connection.execute("PRAGMA busy_timeout=5000")
            await connection.executescript(SCHEMA)
        except BaseException:
            await connection.close()
            raise
        reader = await aiosqlite.connect(path, isolation_level=None)
        try:
            await reader.execute("PRAGMA busy_timeout=5000")
            await reader.execute("PRAGMA query_only=ON")
        except BaseException:
            await reader.close()
            await connection.close()
            raise
        jsonl_file = None
        if jsonl is not None:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            jsonl_file = jsonl.open("a", encoding="utf-8")
        return cls(connection, jsonl_file, reader)

    async def close(self) -> None:
        async with self._lock:
            if self._reader is not self._db:
                await self._reader.close()
            await self._db.close()
            if self._jsonl is not None:
                self._jsonl.close()

    async def insert_readings(self, readings: Sequence[StoredReading]) -> int:
        """Stores the readings not stored yet; returns how many were new."""
        received_at = time.time_ns()
        chunks = [readings[i : i + _ROWS_PER_STATEMENT] for i in range(0, len(readings), _ROWS_PER_STATEMENT)]
        new: list[StoredReading] = []
        async with self._lock:
            if len(chunks) == 1:
                # One statement is a transaction of its own (autocommit): one trip to the database thread.
                new = await self._insert_chunk(chunks[0], received_at)
            else:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    for chunk in chunks:
                        new.extend(await self._insert_chunk(chunk, received_at))
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
            if self._jsonl is not None and new:
                await asyncio.to_thread(_append_lines, self._jsonl, [r.to_json_line() for r in new])
        return len(new)

    async def _insert_chunk(self, chunk: Sequence[StoredReading], received_at: int) -> list[StoredReading]:
        placeholders = ",".join(["(?,?,?,?,?,?)"] * len(chunk))
        params: list[object] = []
        for r in chunk:
            params.extend((r.permission_id, r.data_tag, r.time_ns, r.value, r.unit, received_at))
        sql = (
            f"INSERT OR IGNORE INTO readings ({_COLUMNS}, received_at) VALUES {placeholders} "  # noqa: S608
            f"RETURNING {_COLUMNS}"
        )
        rows = await self._db.execute_fetchall(sql, params)
        return [StoredReading(*row) for row in rows]

    async def record_permission(self, permission_id: str, eligible_party: str, instance_id: str) -> None:
        """Remembers who a permission's data is for, as first seen on a sink token.

        Every Publish stream opens with this call, so it must not make streams wait on one another
        (issue 15.7, bench/sink_churn.py): a permission recorded recently is not written again, and
        first-seen permissions arriving together are written in one transaction (one fsync), not one
        transaction each behind the writer's and the readers' turns on the database.
        """
        if permission_id in self._recorded:
            self._recorded.move_to_end(permission_id)
            return
        self._unrecorded[permission_id] = (eligible_party, instance_id)
        flushed = self._recording
        if flushed is None:
            flushed = self._recording = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._record_permissions(flushed))
        await asyncio.shield(flushed)

    async def _record_permissions(self, flushed: asyncio.Future[None]) -> None:
        """Writes every permission queued until this task's turn on the database, in one transaction."""
        try:
            async with self._lock:
                rows, self._unrecorded, self._recording = self._unrecorded, {}, None
                self._in_flight = rows
                now = time.time_ns()
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    await self._db.executemany(
                        "INSERT OR IGNORE INTO permissions (permission_id, eligible_party, instance_id, "
                        "first_seen) VALUES (?, ?, ?, ?)",
                        [(p, ep, instance, now) for p, (ep, instance) in rows.items()],
                    )
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
        except BaseException as exc:
            self._in_flight = {}
            if self._recording is flushed:
                self._recording = None
            flushed.set_exception(exc)
            flushed.exception()  # retrieved: the callers waiting on it get it
            return
        self._in_flight = {}
        for permission_id in rows:
            self._recorded[permission_id] = None
        while len(self._recorded) > RECORDED_CACHE_SIZE:
            self._recorded.popitem(last=False)
        flushed.set_result(None)

    async def eligible_party_of(self, permission_id: str) -> str | None:
        """Whose the permission's readings are: as recorded, or as being recorded right now."""
        pending = self._unrecorded.get(permission_id) or self._in_flight.get(permission_id)
        if pending is not None:
            return pending[0]
        async with self._reader.execute(
            "SELECT eligible_party FROM permissions WHERE permission_id = ?", (permission_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def list_readings(
        self, permission_id: str, after: tuple[int, str] | None, limit: int
    ) -> list[StoredReading]:
        """Up to `limit` readings of the permission, oldest first by (time, data_tag), after `after`."""
        sql = f"SELECT {_COLUMNS} FROM readings WHERE permission_id = ?"  # noqa: S608
        params: list[object] = [permission_id]
        if after is not None:
            sql += " AND (time_ns, data_tag) > (?, ?)"
            params.extend(after)
        sql += " ORDER BY time_ns, data_tag LIMIT ?"
        params.append(limit)
        async with self._reader.execute(sql, params) as cursor:
            rows = await cursor.fetchall()
        return [StoredReading(*row) for row in rows]

    async def record_end(self, permission_id: str, state: str) -> None:
        """Remembers for good that the permission has ended (the sink refuses its readings)."""
        async with self._lock:
            await self._db.execute(
                "INSERT OR IGNORE INTO permission_ends (permission_id, state, ended_at) VALUES (?, ?, ?)",
                (permission_id, state, time.time_ns()),
            )
            await self._db.execute("DELETE FROM permission_watches WHERE permission_id = ?", (permission_id,))

    async def ended_permissions(self) -> list[str]:
        async with self._lock, self._db.execute("SELECT permission_id FROM permission_ends") as cursor:
            return [str(row[0]) for row in await cursor.fetchall()]

    async def record_watch(self, permission_id: str, sink_token: str, end_ns: int | None) -> None:
        """Remembers how to follow the permission's end again after a restart."""
        async with self._lock:
            await self._db.execute(
                "INSERT OR REPLACE INTO permission_watches (permission_id, sink_token, end_ns) "
                "VALUES (?, ?, ?)",
                (permission_id, sink_token, end_ns),
            )

    async def watches(self) -> list[tuple[str, str, int | None]]:
        """(permission id, sink token, end in ns or None) of every permission followed and not ended."""
        async with (
            self._lock,
            self._db.execute("SELECT permission_id, sink_token, end_ns FROM permission_watches") as cursor,
        ):
            rows = await cursor.fetchall()
        return [(str(r[0]), str(r[1]), None if r[2] is None else int(r[2])) for r in rows]

    async def secret(self, name: str, size: int = 32) -> bytes:
        """A random secret created on first use and kept in the database."""
        async with self._lock:
            await self._db.execute(
                "INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)",
                (name, secrets.token_bytes(size)),
            )
            async with self._db.execute("SELECT value FROM settings WHERE name = ?", (name,)) as cursor:
                row = await cursor.fetchone()
        assert row is not None
        return bytes(row[0])


def _append_lines(file: IO[str], lines: list[str]) -> None:
    file.write("\n".join(lines) + "\n")
    file.flush()
