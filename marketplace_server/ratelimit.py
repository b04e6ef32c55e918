"""In-process token-bucket rate limits keyed by account, instance or peer."""

from __future__ import annotations

import time
from collections import OrderedDict

from eddie_common.errors import ResourceExhausted


class RateLimiter:
    """`rate_per_minute` events per key with bursts up to `burst`; bounded memory."""

    def __init__(self, rate_per_minute: float, burst: float | None = None, max_keys: int = 100_000) -> None:
        self.rate = rate_per_minute / 60.0
        self.burst = burst if burst is not None else max(1.0, rate_per_minute)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def try_acquire(self, key: str) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def ensure_allowed(self, *keys: str, what: str = "attempts") -> None:
        """Raises RESOURCE_EXHAUSTED when any key has no attempt left; consumes nothing."""
        now = time.monotonic()
        if any(self._tokens(k, now) < 1.0 for k in keys):
            raise ResourceExhausted(f"too many {what}; retry later", reason="RATE_LIMITED")

    def record_failure(self, *keys: str) -> None:
        """Consumes one attempt of each key (for limits that count failed attempts only)."""
        for key in keys:
            self.try_acquire(key)

    def acquire(self, *keys: str, what: str = "requests") -> None:
        """Raises RESOURCE_EXHAUSTED (reason RATE_LIMITED) when any key is over its limit."""
        results = [self.try_acquire(k) for k in keys]
        if not all(results):
            raise ResourceExhausted(f"too many {what}; retry later", reason="RATE_LIMITED")


def peer_host(peer: str) -> str:
    """The client address of a gRPC peer string without its port (`ipv4:1.2.3.4:5678` -> `1.2.3.4`)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] if rest.startswith("[") else rest
        return host.strip("[]") or rest
    return peer
