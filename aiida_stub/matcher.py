"""Does the household's local data match a `DataNeed`? (API.md, "AIIDA profile file").

A need matches when the household's region matches and some source has the
need's energy type, every requested data tag, a native interval
`<= max_granularity`, and data since at least `now - history`.

- An unset (zero) `max_granularity` means any granularity is acceptable.
- Regions compare case-insensitively; empty `regions` means anywhere; a
  household in `AT-9` matches `AT` and `AT-9`, one in `AT` matches only `AT`.

A fleet asks 10,000 instances the same question at once, so verdicts are cached
per (profile, serialized need, second) in a bounded LRU, and each profile is
compiled once into plain integers and sets.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from google.protobuf import duration_pb2

from aiida_stub.profile import Profile, Source, to_micros
from eddie.energy.v1 import energy_pb2

VERDICT_CACHE_SIZE = 4096
_MICROS = 1_000_000


@dataclass(frozen=True, eq=False)
class _CompiledSource:
    source: Source
    energy_type: int
    tags: frozenset[str]
    interval_us: int
    available_since_us: int


class CompiledProfile:
    """A profile reduced to what matching needs; hashed by identity."""

    __slots__ = ("profile", "regions", "sources")

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        country = profile.region.split("-", 1)[0]
        self.regions = frozenset({profile.region.upper(), country.upper()})
        self.sources = tuple(
            _CompiledSource(
                source=s,
                energy_type=s.energy_type,
                tags=frozenset(s.data_tags),
                interval_us=to_micros(s.interval),
                available_since_us=to_micros(s.available_since),
            )
            for s in profile.sources
        )

    def find_source(self, need: energy_pb2.DataNeed, now_us: int) -> Source | None:
        """The first source that can serve `need` at `now_us`, or None."""
        if need.regions and not any(r.strip().upper() in self.regions for r in need.regions):
            return None
        max_us = _duration_us(need.max_granularity)
        oldest_needed_us = now_us - _duration_us(need.history)
        tags = set(need.data_tags)
        for s in self.sources:
            if (
                s.energy_type == need.energy_type
                and tags <= s.tags
                and (max_us <= 0 or s.interval_us <= max_us)
                and s.available_since_us <= oldest_needed_us
            ):
                return s.source
        return None


def _duration_us(d: duration_pb2.Duration) -> int:
    return int(d.seconds) * _MICROS + int(d.nanos) // 1000


_compiled: dict[int, CompiledProfile] = {}


def compile_profile(profile: Profile) -> CompiledProfile:
    """The compiled form of `profile`, built once per profile object."""
    compiled = _compiled.get(id(profile))
    if compiled is None or compiled.profile is not profile:
        compiled = _compiled[id(profile)] = CompiledProfile(profile)
    return compiled


@functools.lru_cache(maxsize=VERDICT_CACHE_SIZE)
def _cached_verdict(compiled: CompiledProfile, need_bytes: bytes, now_s: int) -> bool:
    need = energy_pb2.DataNeed.FromString(need_bytes)
    return compiled.find_source(need, now_s * _MICROS) is not None


def matches(profile: Profile, data_need: energy_pb2.DataNeed, now: float) -> bool:
    """Whether `profile` can serve `data_need` at `now` (POSIX seconds, rounded down to the second)."""
    return _cached_verdict(
        compile_profile(profile), data_need.SerializeToString(deterministic=True), int(now)
    )


def find_source(profile: Profile, data_need: energy_pb2.DataNeed, now: float) -> Source | None:
    """The source that serves `data_need` (uncached; used once per configured access)."""
    return compile_profile(profile).find_source(data_need, int(now) * _MICROS)
