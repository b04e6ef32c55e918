"""The matcher decides exactly per API.md: energy type, all tags, granularity, history, region."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest
from google.protobuf import duration_pb2

from aiida_stub.matcher import find_source, matches
from aiida_stub.profile import Profile, Source
from eddie.energy.v1 import energy_pb2

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SINCE = datetime(2024, 3, 1, tzinfo=UTC)
HISTORY_AVAILABLE = int((NOW - SINCE).total_seconds())  # exactly the history the sources hold
ELEC = energy_pb2.ENERGY_TYPE_ELECTRICITY
GAS = energy_pb2.ENERGY_TYPE_NATURAL_GAS


def source(energy_type: int, interval_s: int, tags: dict[str, str], since: datetime = SINCE) -> Source:
    return Source(energy_type, timedelta(seconds=interval_s), since, MappingProxyType(tags))


def profile(region: str = "AT-9", *sources: Source) -> Profile:
    default = source(ELEC, 1, {"1-0:1.8.0": "kWh", "1-0:2.8.0": "kWh", "1-0:1.7.0": "W"})
    return Profile(region=region, seed=1, sources=sources or (default,))


def seconds(n: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=n)


def need(
    energy_type: int = ELEC,
    tags: tuple[str, ...] = ("1-0:1.8.0",),
    max_s: int | None = 900,
    history_s: int = 0,
    regions: tuple[str, ...] = (),
) -> energy_pb2.DataNeed:
    kwargs: dict[str, Any] = {"energy_type": energy_type, "data_tags": list(tags), "regions": list(regions)}
    if max_s is not None:
        kwargs["max_granularity"] = seconds(max_s)
    kwargs["history"] = seconds(history_s)
    kwargs["min_granularity"] = seconds(1)
    return energy_pb2.DataNeed(**kwargs)


TWO_SOURCES = profile(
    "AT-9",
    source(GAS, 900, {"7-0:3.0.0": "m3"}),
    source(ELEC, 60, {"1-0:1.8.0": "kWh", "1-0:2.8.0": "kWh"}),
)

CASES: list[tuple[str, Profile, energy_pb2.DataNeed, bool]] = [
    ("energy type matches", profile(), need(), True),
    ("other energy type", profile(), need(energy_type=GAS), False),
    ("unspecified energy type", profile(), need(energy_type=energy_pb2.ENERGY_TYPE_UNSPECIFIED), False),
    ("subset of tags", profile(), need(tags=("1-0:1.8.0", "1-0:1.7.0")), True),
    ("all tags", profile(), need(tags=("1-0:1.8.0", "1-0:2.8.0", "1-0:1.7.0")), True),
    ("no tags asked", profile(), need(tags=()), True),
    ("one tag missing", profile(), need(tags=("1-0:1.8.0", "1-0:2.7.0")), False),
    (
        "granularity equal to the bound",
        profile("AT-9", source(ELEC, 900, {"1-0:1.8.0": "kWh"})),
        need(max_s=900),
        True,
    ),
    ("native finer than the bound", profile(), need(max_s=900), True),
    (
        "native coarser than the bound",
        profile("AT-9", source(ELEC, 3600, {"1-0:1.8.0": "kWh"})),
        need(max_s=900),
        False,
    ),
    (
        "unset max granularity accepts any",
        profile("AT-9", source(ELEC, 86400, {"1-0:1.8.0": "kWh"})),
        need(max_s=None),
        True,
    ),
    (
        "zero max granularity accepts any",
        profile("AT-9", source(ELEC, 86400, {"1-0:1.8.0": "kWh"})),
        need(max_s=0),
        True,
    ),
    ("no history needed", profile(), need(history_s=0), True),
    ("history just long enough", profile(), need(history_s=HISTORY_AVAILABLE), True),
    ("history one second too long", profile(), need(history_s=HISTORY_AVAILABLE + 1), False),
    ("empty regions match anywhere", profile("DE-BY"), need(regions=()), True),
    ("household AT-9 matches AT", profile("AT-9"), need(regions=("AT",)), True),
    ("household AT-9 matches AT-9", profile("AT-9"), need(regions=("AT-9",)), True),
    ("regions compare case-insensitively", profile("AT-9"), need(regions=("at-9",)), True),
    ("household AT-9 does not match AT-6", profile("AT-9"), need(regions=("AT-6",)), False),
    ("household AT-9 does not match DE", profile("AT-9"), need(regions=("DE",)), False),
    ("one of several regions", profile("AT-9"), need(regions=("DE", "AT-9")), True),
    ("country-only household matches the country", profile("AT"), need(regions=("AT",)), True),
    ("country-only household does not match a state", profile("AT"), need(regions=("AT-9",)), False),
    ("only the second source qualifies", TWO_SOURCES, need(tags=("1-0:2.8.0",), max_s=60), True),
    ("no single source has everything", TWO_SOURCES, need(tags=("1-0:1.8.0", "7-0:3.0.0")), False),
    ("gas source of two", TWO_SOURCES, need(energy_type=GAS, tags=("7-0:3.0.0",), max_s=900), True),
    ("gas source too coarse", TWO_SOURCES, need(energy_type=GAS, tags=("7-0:3.0.0",), max_s=60), False),
]


@pytest.mark.parametrize(("case", "household", "data_need", "expected"), CASES, ids=[c[0] for c in CASES])
def test_matcher(case: str, household: Profile, data_need: energy_pb2.DataNeed, expected: bool) -> None:
    assert matches(household, data_need, NOW.timestamp()) is expected
    # the cached verdict agrees with a fresh evaluation
    assert (find_source(household, data_need, NOW.timestamp()) is not None) is expected
    assert matches(household, data_need, NOW.timestamp()) is expected


def test_find_source_returns_the_qualifying_source() -> None:
    found = find_source(TWO_SOURCES, need(tags=("1-0:2.8.0",), max_s=60), NOW.timestamp())
    assert found is TWO_SOURCES.sources[1]


def test_verdicts_follow_the_clock() -> None:
    """A cached verdict is per second: the same need matches once enough history has accrued."""
    household = profile()
    data_need = need(history_s=HISTORY_AVAILABLE + 1)
    assert not matches(household, data_need, NOW.timestamp())
    assert matches(household, data_need, NOW.timestamp() + 1)


def test_a_future_meter_matches_nothing() -> None:
    household = profile("AT-9", source(ELEC, 1, {"1-0:1.8.0": "kWh"}, since=NOW + timedelta(days=1)))
    assert not matches(household, need(), NOW.timestamp())
