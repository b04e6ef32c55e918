"""Retry pacing for every program: exponential backoff with jitter, and how loudly to log retries."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

# Jitter from a generator of our own: the global `random` state belongs to the application (and tests).
_jitter = random.Random()


@dataclass(frozen=True)
class Backoff:
    """Waits `initial`, doubling per attempt up to `cap`, each scaled by a random 0.5-1.0."""

    initial: float = 0.2
    cap: float = 5.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1, 2, ...)."""
        return min(self.initial * 2.0 ** min(attempt - 1, 30), self.cap) * _jitter.uniform(0.5, 1.0)


def retry_log_level(attempt: int) -> int:
    """Log the first failures and every 20th; the rest at debug, so an outage does not flood the log."""
    return logging.WARNING if attempt <= 3 or attempt % 20 == 0 else logging.DEBUG
