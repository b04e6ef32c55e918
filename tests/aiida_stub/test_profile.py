"""Profile files: the shipped examples load, bad files fail with a message naming the key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aiida_stub.profile import ProfileError, load_profile, load_profiles, parse_duration, shipped_profiles_dir
from eddie.energy.v1 import energy_pb2

SHIPPED = ["berlin-flat", "germany-heatpump", "graz-gas", "hydrogen-pilot", "vienna-p1"]

VALID = """
region = "AT-9"
seed = 7
[[sources]]
energy_type = "ELECTRICITY"
interval = "PT1S"
available_since = "2024-03-01T00:00:00Z"
data_tags = { "1-0:1.8.0" = "kWh" }
"""


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name: str) -> None:
    profile = load_profile(shipped_profiles_dir() / f"{name}.toml")
    assert profile.name == name
    assert profile.description
    assert profile.sources
    for source in profile.sources:
        assert source.interval > timedelta(0)
        assert source.available_since.tzinfo is not None
        assert source.data_tags


def test_directory_loads_every_profile_in_name_order() -> None:
    assert [p.name for p in load_profiles([shipped_profiles_dir()])] == SHIPPED


def test_vienna_profile_has_the_p1_tags_at_one_second() -> None:
    profile = load_profile(shipped_profiles_dir() / "vienna-p1.toml")
    (source,) = profile.sources
    assert profile.region == "AT-9"
    assert source.energy_type == energy_pb2.ENERGY_TYPE_ELECTRICITY
    assert source.interval == timedelta(seconds=1)
    assert source.available_since == datetime(2024, 3, 1, tzinfo=UTC)
    assert dict(source.data_tags) == {
        "1-0:1.8.0": "kWh",
        "1-0:2.8.0": "kWh",
        "1-0:1.7.0": "W",
        "1-0:2.7.0": "W",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PT1S", timedelta(seconds=1)),
        ("PT15M", timedelta(minutes=15)),
        ("PT1H", timedelta(hours=1)),
        ("P1D", timedelta(days=1)),
        ("P1DT2H3M4.5S", timedelta(days=1, hours=2, minutes=3, seconds=4.5)),
        ("pt30s", timedelta(seconds=30)),
    ],
)
def test_parse_duration_accepts_the_subset(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "P", "PT", "P1DT", "15M", "PT-1S", "P1Y", "P1M", "PT1.5M", "1 hour"])
def test_parse_duration_rejects_everything_else(text: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('region = "AT-9"', 'region = "Vienna"'), "region"),
        (("seed = 7", 'seed = "seven"'), "seed"),
        (("seed = 7", 'seed = 7\ncolour = "red"'), "unknown key(s) colour"),
        (('energy_type = "ELECTRICITY"', 'energy_type = "PLUTONIUM"'), "sources[0].energy_type"),
        (('interval = "PT1S"', 'interval = "one second"'), "sources[0].interval"),
        (('interval = "PT1S"', 'interval = "PT0S"'), "sources[0].interval"),
        (
            ('available_since = "2024-03-01T00:00:00Z"', 'available_since = "2024-03-01T00:00:00"'),
            "sources[0].available_since",
        ),
        (
            ('available_since = "2024-03-01T00:00:00Z"', 'available_since = "yesterday"'),
            "sources[0].available_since",
        ),
        (('data_tags = { "1-0:1.8.0" = "kWh" }', "data_tags = {}"), "sources[0].data_tags"),
        (('data_tags = { "1-0:1.8.0" = "kWh" }', 'data_tags = { "1-0:1.8.0" = 3 }'), "sources[0].data_tags"),
        (
            ('data_tags = { "1-0:1.8.0" = "kWh" }', 'data_tags = { "1-0:1.8.0" = "kWh" }\nfoo = 1'),
            "unknown key(s) foo",
        ),
        (('interval = "PT1S"\n', ""), "missing key(s) interval"),
        (("[[sources]]", "[sourcez]"), "unknown key(s) sourcez"),
    ],
)
def test_invalid_profile_is_a_readable_error(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = write(tmp_path, VALID.replace(*change))
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_not_toml_is_a_readable_error(tmp_path: Path) -> None:
    path = write(tmp_path, "region = [unclosed")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(path)


def test_missing_file_is_a_readable_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "nope.toml")


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"no \*\.toml"):
        load_profiles([tmp_path])


def test_optional_name_defaults_to_the_file_name(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, VALID, "my-home.toml"))
    assert profile.name == "my-home"
    assert profile.description == ""
