"""The simulated meter: deterministic, monotonic registers, aggregation per the Reading contract."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import pytest

from aiida_stub.meter import Meter, tag_kind
from aiida_stub.profile import Source, load_profile, shipped_profiles_dir
from eddie.energy.v1 import energy_pb2

S = 1_000_000
DAY = datetime(2025, 6, 10, tzinfo=UTC)
T0 = int(DAY.timestamp()) * S
P1_TAGS = {"1-0:1.8.0": "kWh", "1-0:2.8.0": "kWh", "1-0:1.7.0": "W", "1-0:2.7.0": "W"}


def p1_source(interval_s: int = 1) -> Source:
    since = datetime(2024, 3, 1, tzinfo=UTC)
    return Source(
        energy_pb2.ENERGY_TYPE_ELECTRICITY, timedelta(seconds=interval_s), since, MappingProxyType(P1_TAGS)
    )


def test_same_seed_same_values_in_a_fresh_meter() -> None:
    src = p1_source()
    first = list(Meter(7).readings(src, P1_TAGS, T0, T0 + 600 * S, 60 * S))
    second = list(Meter(7).readings(src, P1_TAGS, T0, T0 + 600 * S, 60 * S))
    assert first == second
    assert len(first) == 10 * 4


def test_another_seed_other_values() -> None:
    src = p1_source()
    assert Meter(7).register(src, "1-0:1.8.0", T0) != Meter(8).register(src, "1-0:1.8.0", T0)


def test_values_do_not_depend_on_what_was_asked_before() -> None:
    src = p1_source()
    warm = Meter(7)
    list(warm.readings(src, P1_TAGS, T0 - 86400 * S, T0, 3600 * S))
    assert warm.value(src, "1-0:1.7.0", T0, T0 + 900 * S) == Meter(7).value(
        src, "1-0:1.7.0", T0, T0 + 900 * S
    )


@pytest.mark.parametrize("tag", ["1-0:1.8.0", "1-0:2.8.0"])
def test_registers_are_monotonic(tag: str) -> None:
    meter, src = Meter(3), p1_source()
    values = [meter.register(src, tag, T0 + i * 7 * S) for i in range(86400 // 7)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[-1] > values[0]


def test_fifteen_minute_register_is_the_value_at_the_interval_end() -> None:
    meter, src = Meter(7), p1_source()
    native = list(meter.readings(src, ["1-0:1.8.0"], T0, T0 + 900 * S, 1 * S))
    (coarse,) = meter.readings(src, ["1-0:1.8.0"], T0, T0 + 900 * S, 900 * S)
    assert coarse.time_us == native[-1].time_us == T0 + 900 * S
    assert coarse.value == native[-1].value


def test_fifteen_minute_power_is_the_mean_of_the_native_readings() -> None:
    meter, src = Meter(7), p1_source()
    start = T0 + 7 * 3600 * S  # morning peak
    native = [r.value for r in meter.readings(src, ["1-0:1.7.0"], start, start + 900 * S, 1 * S)]
    (coarse,) = meter.readings(src, ["1-0:1.7.0"], start, start + 900 * S, 900 * S)
    assert len(native) == 900
    assert coarse.value == pytest.approx(sum(native) / len(native), rel=1e-9)
    assert min(native) < coarse.value < max(native)  # the native values vary


def test_power_and_energy_agree() -> None:
    meter, src = Meter(7), p1_source()
    start, end = T0, T0 + 3600 * S
    kwh = meter.register(src, "1-0:1.8.0", end) - meter.register(src, "1-0:1.8.0", start)
    watts = meter.mean_power(src, "1-0:1.7.0", start, end)
    assert watts == pytest.approx(kwh * 1000, rel=1e-9)


def test_household_load_curve_is_plausible() -> None:
    meter, src = Meter(7), p1_source()
    hourly = [
        meter.mean_power(src, "1-0:1.7.0", T0 + h * 3600 * S, T0 + (h + 1) * 3600 * S) for h in range(24)
    ]
    assert all(20 < w < 5000 for w in hourly)
    assert max(hourly[17:21]) > 2 * min(hourly[0:4])  # evening peak above the night base load
    daily_kwh = meter.register(src, "1-0:1.8.0", T0 + 86400 * S) - meter.register(src, "1-0:1.8.0", T0)
    assert 1 < daily_kwh < 40


def test_pv_exports_around_noon_only() -> None:
    meter, src = Meter(7), p1_source()
    noon = meter.mean_power(src, "1-0:2.7.0", T0 + 10 * 3600 * S, T0 + 12 * 3600 * S)
    night = meter.mean_power(src, "1-0:2.7.0", T0 + 0 * 3600 * S, T0 + 3 * 3600 * S)
    assert night == 0.0
    assert noon > 100.0


def test_last_interval_ends_at_the_window_end() -> None:
    meter, src = Meter(7), p1_source()
    readings = list(meter.readings(src, ["1-0:1.8.0"], T0, T0 + 150 * S, 60 * S))
    assert [r.time_us for r in readings] == [T0 + 60 * S, T0 + 120 * S, T0 + 150 * S]


@pytest.mark.parametrize(
    "name", ["graz-gas", "germany-heatpump", "hydrogen-pilot", "berlin-flat", "vienna-p1"]
)
def test_every_shipped_source_produces_positive_values(name: str) -> None:
    profile = load_profile(shipped_profiles_dir() / f"{name}.toml")
    meter = Meter(profile.seed)
    for src in profile.sources:
        for reading in meter.readings(src, src.data_tags, T0, T0 + 3600 * S, 900 * S):
            assert reading.value >= 0
            assert reading.unit == src.data_tags[reading.tag]


@pytest.mark.parametrize(
    ("tag", "cumulative", "export"),
    [
        ("1-0:1.8.0", True, False),
        ("1-0:2.8.0", True, True),
        ("1-0:1.7.0", False, False),
        ("1-0:2.7.0", False, True),
        ("7-0:3.0.0", True, False),
        ("6-0:1.0.0", True, False),
        ("custom", True, False),
    ],
)
def test_tag_kinds(tag: str, cumulative: bool, export: bool) -> None:
    kind = tag_kind(tag)
    assert (kind.cumulative, kind.export) == (cumulative, export)
