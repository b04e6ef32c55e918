"""Token-bucket rate limits keyed by account, instance or peer: in memory, or shared in PostgreSQL.

One interface (`Limiter`) whatever the backing:

- `RateLimiter` keeps the buckets in this process (one process, SQLite or PostgreSQL);
- `DatabaseRateLimiter` keeps them in the `rate_limits` table, so a limit holds across the
  replicas of a cluster (attempts spread over replicas A, B and C count like attempts at one).
  Each take is one atomic statement (`INSERT … ON CONFLICT DO UPDATE … RETURNING`) that refills
  the bucket by the database's clock; concurrent takes of one key serialize on its row. Rows
  that have refilled completely equal no row at all and are deleted by `RateLimitJanitor`.

Limits that count failed attempts only (pairing codes, sign-ins) take an attempt first and
give it back (`refund`) when the attempt succeeds: concurrent wrong guesses cannot pass a
check together before any of them is counted. `Attempts` does this, and lets an attempt that
finds its key exhausted wait for the attempts still being checked: right ones arriving together
(a customer app's backend signing its users in from one address, an installer claiming a
household's devices at once) are not refused for each other's company.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Protocol

from sqlalchemy import Float, case, cast, delete, func, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from eddie_common.errors import ResourceExhausted
from eddie_common.logging import log_event
from marketplace_server.background import Loop
from marketplace_server.db.models import RateLimitRow

__all__ = [
    "Attempt",
    "Attempts",
    "DatabaseRateLimiter",
    "Limiter",
    "RateLimitJanitor",
    "RateLimiter",
    "autocommit",
    "elapsed_seconds",
    "peer_host",
    "rate_limiter",
    "row_key",
    "seconds_from_now",
]

log = logging.getLogger(__name__)

CLEANUP_SECONDS = 60.0
PATIENCE_SECONDS = 5.0  # how long an attempt may wait for others still being checked
SETTLE_POLL_SECONDS = 0.5  # a waiter re-checks at least this often (no wake-up can be missed for long)


def _limited(what: str) -> ResourceExhausted:
    return ResourceExhausted(f"too many {what}; retry later", reason="RATE_LIMITED")


class Limiter(Protocol):
    """What callers use, in memory or in the database alike."""

    async def acquire(self, *keys: str, what: str = "requests") -> None:
        """Takes one event of every key, or none: RESOURCE_EXHAUSTED (RATE_LIMITED) when any key has
        no event left."""

    async def refund(self, *keys: str) -> None:
        """Gives back what `acquire` took (the attempt did not count, e.g. the right pairing code)."""


class RateLimiter:
    """`rate_per_minute` events per key with bursts up to `burst`, in this process; bounded memory."""

    def __init__(self, rate_per_minute: float, burst: float | None = None, max_keys: int = 100_000) -> None:
        self.rate = rate_per_minute / 60.0
        self.burst = burst if burst is not None else max(1.0, rate_per_minute)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _put(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def try_acquire(self, key: str) -> bool:
        now = time.monotonic()
        tokens = self._tokens(key, now)
        allowed = tokens >= 1.0
        self._put(key, tokens - 1.0 if allowed else tokens, now)
        return allowed

    def give_back(self, key: str) -> None:
        now = time.monotonic()
        self._put(key, min(self.burst, self._tokens(key, now) + 1.0), now)

    async def acquire(self, *keys: str, what: str = "requests") -> None:
        taken: list[str] = []
        for key in keys:  # no await in between: all or none, atomically in this process
            if not self.try_acquire(key):
                for earlier in taken:
                    self.give_back(earlier)
                raise _limited(what)
            taken.append(key)

    async def refund(self, *keys: str) -> None:
        for key in keys:
            self.give_back(key)


class Attempt:
    """One attempt taken by `Attempts.attempt`; `succeeded` gives its event back (once)."""

    def __init__(self, limiter: Limiter, keys: tuple[str, ...]) -> None:
        self._limiter = limiter
        self._keys = keys
        self._refunded = False

    async def succeeded(self) -> None:
        if not self._refunded:
            self._refunded = True
            await self._limiter.refund(*self._keys)


class Attempts:
    """Take-first attempts that count only when they fail, on any `Limiter`.

    An attempt takes one event of every key before it is checked and gives it back when it
    succeeds. One that finds a key exhausted while attempts on that key are still being checked in
    this process waits for them to settle (at most `patience` seconds) and tries again, so right
    attempts are not refused for arriving together; it is refused once none is left in flight (wrong
    ones keep their events). Attempts in flight at other replicas are not waited for. Each settled
    attempt wakes one waiter, the last one on a key wakes all of them: linear in the waiters, also
    for a flood of wrong guesses against the database-backed limiter.
    """

    def __init__(self, limiter: Limiter, patience: float = PATIENCE_SECONDS) -> None:
        self.limiter = limiter
        self.patience = patience
        self._checking: Counter[str] = Counter()
        self._settled = 0  # attempts settled so far (a refusal read before one settled is stale)
        self._waiters: list[tuple[tuple[str, ...], asyncio.Future[None]]] = []

    @contextlib.asynccontextmanager
    async def attempt(self, *keys: str, what: str) -> AsyncIterator[Attempt]:
        await self._take(keys, what)
        self._checking.update(keys)
        try:
            yield Attempt(self.limiter, keys)
        finally:
            self._checking.subtract(keys)
            for key in keys:
                if self._checking[key] <= 0:
                    del self._checking[key]
            self._settled += 1
            self._wake(keys)

    async def _take(self, keys: tuple[str, ...], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.patience
        while True:
            settled = self._settled
            try:
                await self.limiter.acquire(*keys, what=what)
                return
            except ResourceExhausted:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise
                if self._settled != settled:
                    continue  # an attempt settled (perhaps giving its event back) while we asked: ask again
                if not any(self._checking[key] for key in keys):
                    raise
            entry = (keys, loop.create_future())
            self._waiters.append(entry)
            try:
                await asyncio.wait_for(asyncio.shield(entry[1]), min(remaining, SETTLE_POLL_SECONDS))
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)

    def _wake(self, keys: tuple[str, ...]) -> None:
        """After an attempt on `keys` settled: the first waiter sharing a key may now succeed; when a
        key has nothing left in flight, every waiter on it learns its answer."""
        idle = {key for key in keys if not self._checking[key]}
        woken_one = False
        for waiting_keys, future in list(self._waiters):
            if future.done() or not set(waiting_keys) & set(keys):
                continue
            if idle & set(waiting_keys) or not woken_one:
                future.set_result(None)
                woken_one = True


def row_key(limit: str, key: str) -> str:
    """The `rate_limits` primary key of `key` under the limit named `limit`: a digest, so the table
    holds no e-mail or address in clear."""
    return hashlib.sha256(f"{limit}\x00{key}".encode()).hexdigest()


def elapsed_seconds(since: Any) -> Any:
    """Seconds from `since` to now by the database's clock (never negative: a transaction may have
    started before a concurrent one's update)."""
    return func.greatest(0.0, cast(func.extract("epoch", func.now() - since), Float))


def seconds_from_now(seconds: Any) -> Any:
    return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, seconds)


def _take(key: str, burst: float, rate: float) -> Any:
    """One statement: refill the key's bucket by the elapsed time, take one token if there is one,
    say whether it did. A new key starts with a full bucket."""
    refilled = func.least(burst, RateLimitRow.level + elapsed_seconds(RateLimitRow.updated_at) * rate)
    allowed = refilled >= 1.0
    level = case((allowed, refilled - 1.0), else_=refilled)
    statement = postgresql.insert(RateLimitRow).values(
        key=key,
        level=burst - 1.0,
        updated_at=func.now(),
        idle_at=seconds_from_now(1.0 / rate),
        allowed=True,
    )
    return statement.on_conflict_do_update(
        index_elements=[RateLimitRow.key],
        set_={
            "level": level,
            "allowed": allowed,
            "updated_at": func.now(),
            "idle_at": seconds_from_now((burst - level) / rate),
        },
    ).returning(RateLimitRow.allowed)


def _refund(key: str, burst: float, rate: float) -> Any:
    refilled = func.least(burst, RateLimitRow.level + elapsed_seconds(RateLimitRow.updated_at) * rate)
    level = func.least(burst, refilled + 1.0)
    return (
        update(RateLimitRow)
        .where(RateLimitRow.key == key)
        .values(level=level, updated_at=func.now(), idle_at=seconds_from_now((burst - level) / rate))
    )


def autocommit(sessions: async_sessionmaker[AsyncSession]) -> AsyncEngine:
    """The sessions' engine without BEGIN / COMMIT round trips: each statement is its own transaction."""
    engine: AsyncEngine = sessions.kw["bind"]
    return engine.execution_options(isolation_level="AUTOCOMMIT")


class DatabaseRateLimiter:
    """The same limit as `RateLimiter`, with its buckets in the database (cluster mode; PostgreSQL).
    Each take or refund is one statement, committed on its own (autocommit)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        name: str,
        rate_per_minute: float,
        burst: float | None = None,
    ) -> None:
        self.engine = autocommit(sessions)
        self.name = name
        self.rate = rate_per_minute / 60.0
        self.burst = burst if burst is not None else max(1.0, rate_per_minute)

    async def try_acquire(self, key: str) -> bool:
        async with self.engine.connect() as connection:
            result = await connection.execute(_take(row_key(self.name, key), self.burst, self.rate))
            return bool(result.scalar())

    async def acquire(self, *keys: str, what: str = "requests") -> None:
        taken: list[str] = []
        for key in keys:
            if not await self.try_acquire(key):
                if taken:
                    await self.refund(*taken)
                raise _limited(what)
            taken.append(key)

    async def refund(self, *keys: str) -> None:
        async with self.engine.connect() as connection:
            for key in keys:
                await connection.execute(_refund(row_key(self.name, key), self.burst, self.rate))


def rate_limiter(
    name: str, rate_per_minute: float, sessions: async_sessionmaker[AsyncSession] | None
) -> Limiter:
    """In the database when given `sessions` (cluster mode), else in this process."""
    if sessions is not None:
        return DatabaseRateLimiter(sessions, name, rate_per_minute)
    return RateLimiter(rate_per_minute)


class RateLimitJanitor:
    """Deletes the `rate_limits` rows that have gone idle (a full bucket, a decayed score)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], interval: float = CLEANUP_SECONDS) -> None:
        self.sessions = sessions
        self.interval = interval
        self.loop = Loop(self._sweep, "rate_limit_cleanup")

    async def delete_idle(self) -> int:
        async with self.sessions.begin() as session:
            result: Any = await session.execute(delete(RateLimitRow).where(RateLimitRow.idle_at < func.now()))
        count = int(result.rowcount or 0)
        if count:
            log_event(log, "rate_limits_expired", logging.DEBUG, count=count)
        return count

    async def _sweep(self) -> float:
        await self.delete_idle()
        return self.interval

    async def run(self) -> None:
        await self.loop.run()

    async def stop(self) -> None:
        await self.loop.stop()


def peer_host(peer: str) -> str:
    """The client address of a gRPC peer string without its port (`ipv4:1.2.3.4:5678` -> `1.2.3.4`)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] if rest.startswith("[") else rest
        return host.strip("[]") or rest
    return peer
