"""Failed sign-ins: a hard limit per peer, a slow-down per account, never a per-account lock.

A per-account lock lets anyone lock a victim out by failing on purpose with the victim's
e-mail. So the account key only slows sign-ins down: after a few recent failures every
attempt for that e-mail (the victim's too) waits a little, doubling per failure up to
`max_delay`, which makes guessing one account slow without making it impossible for its
owner. The hard limit (RESOURCE_EXHAUSTED, RATE_LIMITED) is per peer address: an attacker's
own address is cut off, the victim's is not.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from marketplace_server.ratelimit import RateLimiter

__all__ = ["LoginThrottle"]

FREE_FAILURES = 3  # recent failures of an account before its sign-ins slow down
BASE_DELAY = 0.05
MAX_DELAY = 1.0
MAX_ACCOUNTS = 100_000


class LoginThrottle:
    """Counts failed sign-ins by peer (limit) and by account (slow-down)."""

    def __init__(
        self,
        attempts_per_minute: float,
        *,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.peers = RateLimiter(attempts_per_minute)
        self.max_delay = max_delay
        # A failure is forgotten at the same rate a peer regains an attempt.
        self._decay = max(attempts_per_minute, 1.0) / 60.0
        self._clock = clock
        self._failures: OrderedDict[str, tuple[float, float]] = OrderedDict()  # account -> (score, when)

    def ensure_allowed(self, peer: str) -> None:
        """RESOURCE_EXHAUSTED (RATE_LIMITED) when the peer has used up its failed attempts."""
        self.peers.ensure_allowed(f"peer:{peer}", what="login attempts")

    def delay(self, account: str) -> float:
        """How long a sign-in for `account` waits before its password is checked."""
        excess = float(self._score(account, self._clock()) - FREE_FAILURES)
        if excess < 0:
            return 0.0
        return min(self.max_delay, BASE_DELAY * math.pow(2.0, min(excess, 32.0)))

    def record_failure(self, peer: str, account: str) -> None:
        now = self._clock()
        self.peers.record_failure(f"peer:{peer}")
        score = self._score(account, now) + 1.0
        self._failures.pop(account, None)
        self._failures[account] = (score, now)
        while len(self._failures) > MAX_ACCOUNTS:
            self._failures.popitem(last=False)

    def record_success(self, account: str) -> None:
        """The owner signed in: the account's slow-down ends."""
        self._failures.pop(account, None)

    def _score(self, account: str, now: float) -> float:
        score, when = self._failures.get(account, (0.0, now))
        return max(0.0, score - (now - when) * self._decay)
