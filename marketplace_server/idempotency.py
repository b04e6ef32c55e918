"""AIP-155 request ids: a retried create returns the first result instead of a duplicate.

Used inside the caller's transaction:

    stored = await find(session, account, METHOD, request_id, fp)   # replay?
    if stored is None:
        await remember(session, account, METHOD, request_id, fp, new_id)   # claim first
        ...create the resource with id new_id...

`remember` inserts the key before the resource, so of two concurrent duplicates
the second blocks on the primary key and then fails with `IntegrityError`; the
caller rolls back and calls `find` again in a fresh transaction (see
`find_after_conflict`), which returns the winner's result. `create_once` wraps
a create in exactly that.

Keys expire after `RETENTION.seconds` (default 24 h, `--idempotency-ttl`): `find`
ignores (and deletes) an expired key, and `KeyJanitor` deletes expired keys in the
background, so the table does not grow without bound.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie_common.errors import InvalidArgument, Validator
from eddie_common.logging import log_event
from marketplace_server.background import Loop
from marketplace_server.clock import utcnow
from marketplace_server.db.models import IdempotencyKeyRow

__all__ = [
    "RETENTION",
    "KeyJanitor",
    "Retention",
    "check_request_id",
    "create_once",
    "find",
    "find_after_conflict",
    "fingerprint",
    "remember",
]

log = logging.getLogger(__name__)

DEFAULT_TTL = 86400.0
MAX_CLEANUP_INTERVAL = 600.0


@dataclass
class Retention:
    """How long request ids are remembered; set once at start-up from the configuration."""

    seconds: float = DEFAULT_TTL

    def cutoff(self) -> datetime:
        """Keys created before this have expired."""
        return utcnow() - timedelta(seconds=self.seconds)


RETENTION = Retention()

T = TypeVar("T")

_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)


def check_request_id(v: Validator, request_id: str, field: str = "request_id") -> None:
    """An optional request id is 1 to 64 letters, digits, `-` or `_` (a UUID fits)."""
    if request_id:
        v.check(
            _REQUEST_ID.fullmatch(request_id) is not None,
            field,
            "1 to 64 letters, digits, '-' or '_' (e.g. a UUID)",
        )


def fingerprint(message: Message) -> str:
    """A digest of the (normalized) request content a request id stands for."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def _key(account_id: str, method: str, request_id: str) -> tuple[str, str, str]:
    return (account_id, method, request_id)


async def find(
    session: AsyncSession, account_id: str, method: str, request_id: str, request_fingerprint: str
) -> str | None:
    """The stored result of an earlier call with this request id, or None.

    The same request id with different content is INVALID_ARGUMENT (REQUEST_ID_REUSED).
    """
    row = await session.get(IdempotencyKeyRow, _key(account_id, method, request_id), populate_existing=True)
    if row is None:
        return None
    if row.create_time < RETENTION.cutoff():  # expired: the request id is free again
        await session.delete(row)
        await session.flush()
        return None
    if row.request_hash != request_fingerprint:
        raise InvalidArgument.for_field(
            "request_id", "already used for a different request", reason="REQUEST_ID_REUSED"
        )
    return row.result


async def remember(
    session: AsyncSession,
    account_id: str,
    method: str,
    request_id: str,
    request_fingerprint: str,
    result: str,
) -> None:
    """Claims the request id for `result`; raises IntegrityError if a concurrent call claimed it."""
    session.add(
        IdempotencyKeyRow(
            account_id=account_id,
            method=method,
            request_id=request_id,
            request_hash=request_fingerprint,
            result=result,
            create_time=utcnow(),
        )
    )
    await session.flush()


async def create_once(
    sessions: async_sessionmaker[AsyncSession],
    account_id: str,
    method: str,
    request_id: str,
    request_fingerprint: str,
    create: Callable[[], Awaitable[T]],
    replay: Callable[[str], Awaitable[T]],
) -> T:
    """Runs `create` (which calls `find` / `remember` in its transaction). If it lost the race for
    `request_id` to a concurrent duplicate, returns `replay(winner's stored result)` instead."""
    try:
        return await create()
    except IntegrityError:
        if not request_id:
            raise
        earlier = await find_after_conflict(sessions, account_id, method, request_id, request_fingerprint)
        if earlier is None:
            raise
        return await replay(earlier)


async def find_after_conflict(
    sessions: async_sessionmaker[AsyncSession],
    account_id: str,
    method: str,
    request_id: str,
    request_fingerprint: str,
) -> str | None:
    """`find` in a fresh transaction, after `remember` lost a race and its transaction rolled back."""
    async with sessions() as session:
        return await find(session, account_id, method, request_id, request_fingerprint)


class KeyJanitor:
    """Deletes expired idempotency keys in the background."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], retention: Retention = RETENTION) -> None:
        self.sessions = sessions
        self.retention = retention
        self.loop = Loop(self._sweep, "idempotency_cleanup")

    async def delete_expired(self) -> int:
        """Deletes every expired key; returns how many."""
        async with self.sessions.begin() as session:
            result: Any = await session.execute(
                delete(IdempotencyKeyRow).where(IdempotencyKeyRow.create_time < self.retention.cutoff())
            )
        count = int(result.rowcount or 0)
        if count:
            log_event(log, "idempotency_keys_expired", count=count)
        return count

    async def _sweep(self) -> float:
        await self.delete_expired()
        return min(MAX_CLEANUP_INTERVAL, max(1.0, self.retention.seconds / 10))

    async def run(self) -> None:
        await self.loop.run()

    async def stop(self) -> None:
        await self.loop.stop()
