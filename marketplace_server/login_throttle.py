"""Failed sign-ins: a hard limit per peer, a slow-down per account, never a per-account lock.

A per-account lock lets anyone lock a victim out by failing on purpose with the victim's
e-mail. So the account key only slows sign-ins down: after a few recent failures every
attempt for that e-mail (the victim's too) waits a little, doubling per failure up to
`max_delay`, which makes guessing one account slow without making it impossible for its
owner. The hard limit (RESOURCE_EXHAUSTED, RATE_LIMITED) is per peer address: an attacker's
own address is cut off, the victim's is not.

Each sign-in takes one of its peer's attempts first (`attempt`) and gives it back when the
password was right (`record_success`), so only failures count, and concurrent guesses
cannot all pass the check before one of them is counted; right passwords arriving together
are not refused for each other (`ratelimit.Attempts`). In cluster mode the peer limit and
the accounts' failure scores live in the database (`rate_limits`), so they hold across
replicas; otherwise in this process.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from marketplace_server.db.models import RateLimitRow
from marketplace_server.ratelimit import (
    Attempt,
    Attempts,
    DatabaseRateLimiter,
    Limiter,
    RateLimiter,
    autocommit,
    elapsed_seconds,
    row_key,
    seconds_from_now,
)

__all__ = ["DatabaseFailureScores", "FailureScores", "LoginThrottle", "MemoryFailureScores"]

FREE_FAILURES = 3  # recent failures of an account before its sign-ins slow down
BASE_DELAY = 0.05
MAX_DELAY = 1.0
MAX_ACCOUNTS = 100_000
SCORES = "login-account"  # the failure scores' name in rate_limits


class FailureScores(Protocol):
    """Recent failures per account: +1 per failure, decaying linearly to 0."""

    async def score(self, account: str) -> float: ...

    async def bump(self, account: str) -> None: ...

    async def reset(self, account: str) -> None: ...


class MemoryFailureScores:
    """In this process; at most MAX_ACCOUNTS accounts (the least recently failed are forgotten)."""

    def __init__(self, decay_per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.decay = decay_per_second
        self._clock = clock
        self._failures: OrderedDict[str, tuple[float, float]] = OrderedDict()  # account -> (score, when)

    def _score(self, account: str, now: float) -> float:
        score, when = self._failures.get(account, (0.0, now))
        return max(0.0, score - (now - when) * self.decay)

    async def score(self, account: str) -> float:
        return self._score(account, self._clock())

    async def bump(self, account: str) -> None:
        now = self._clock()
        score = self._score(account, now) + 1.0
        self._failures.pop(account, None)
        self._failures[account] = (score, now)
        while len(self._failures) > MAX_ACCOUNTS:
            self._failures.popitem(last=False)

    async def reset(self, account: str) -> None:
        self._failures.pop(account, None)


def _decayed(decay: float) -> Any:
    return func.greatest(0.0, RateLimitRow.level - elapsed_seconds(RateLimitRow.updated_at) * decay)


class DatabaseFailureScores:
    """In the database (cluster mode): failures at any replica slow the account down at every one."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], decay_per_second: float) -> None:
        self.engine = autocommit(sessions)
        self.decay = decay_per_second

    async def score(self, account: str) -> float:
        async with self.engine.connect() as connection:
            value = (
                await connection.execute(
                    select(_decayed(self.decay)).where(RateLimitRow.key == row_key(SCORES, account))
                )
            ).scalar()
        return float(value or 0.0)

    async def bump(self, account: str) -> None:
        """+1 on the decayed score, in one statement."""
        statement = postgresql.insert(RateLimitRow).values(
            key=row_key(SCORES, account),
            level=1.0,
            updated_at=func.now(),
            idle_at=seconds_from_now(1.0 / self.decay),
            allowed=False,
        )
        level = _decayed(self.decay) + 1.0
        statement = statement.on_conflict_do_update(
            index_elements=[RateLimitRow.key],
            set_={"level": level, "updated_at": func.now(), "idle_at": seconds_from_now(level / self.decay)},
        )
        async with self.engine.connect() as connection:
            await connection.execute(statement)

    async def reset(self, account: str) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(delete(RateLimitRow).where(RateLimitRow.key == row_key(SCORES, account)))


class LoginThrottle:
    """Counts failed sign-ins by peer (limit) and by account (slow-down)."""

    def __init__(
        self,
        attempts_per_minute: float,
        *,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
        sessions: async_sessionmaker[AsyncSession] | None = None,
    ) -> None:
        """With `sessions` (cluster mode) both counts live in the database."""
        # A failure is forgotten at the same rate a peer regains an attempt.
        decay = max(attempts_per_minute, 1.0) / 60.0
        self.peers: Limiter
        self.failures: FailureScores
        if sessions is not None:
            self.peers = DatabaseRateLimiter(sessions, "login-peer", attempts_per_minute)
            self.failures = DatabaseFailureScores(sessions, decay)
        else:
            self.peers = RateLimiter(attempts_per_minute)
            self.failures = MemoryFailureScores(decay, clock)
        self._attempts = Attempts(self.peers)
        self.max_delay = max_delay

    def attempt(self, peer: str) -> AbstractAsyncContextManager[Attempt]:
        """Takes one of the peer's attempts for the block; RESOURCE_EXHAUSTED (RATE_LIMITED) when it
        has none left and none of its attempts is still being checked."""
        return self._attempts.attempt(f"peer:{peer}", what="login attempts")

    async def delay(self, account: str) -> float:
        """How long a sign-in for `account` waits before its password is checked."""
        excess = await self.failures.score(account) - FREE_FAILURES
        if excess < 0:
            return 0.0
        return min(self.max_delay, BASE_DELAY * math.pow(2.0, min(excess, 32.0)))

    async def record_failure(self, account: str) -> None:
        """The password was wrong (the peer's attempt stays taken)."""
        await self.failures.bump(account)

    async def record_success(self, attempt: Attempt, account: str) -> None:
        """The owner signed in: the attempt is given back and the account's slow-down ends."""
        await attempt.succeeded()
        await self.failures.reset(account)
