"""The household profile: which meters the AIIDA has, loaded from a TOML file.

The normative keys are in API.md ("AIIDA profile file"); `name` and
`description` are optional extras. Loading is strict: anything unexpected is a
`ProfileError` naming the file and the key, never a traceback.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from eddie.energy.v1 import energy_pb2

_DURATION = re.compile(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d{1,6})?)S)?)?")
_REGION = re.compile(r"[A-Za-z]{2}(?:-[A-Za-z0-9]{1,3})?")
_TAG = re.compile(r"[A-Za-z0-9:.*&_-]{1,64}")
_TOP_KEYS = frozenset({"region", "seed", "sources", "name", "description"})
_SOURCE_KEYS = frozenset({"energy_type", "interval", "available_since", "data_tags"})
ENERGY_TYPES: Mapping[str, int] = MappingProxyType(
    {
        name.removeprefix("ENERGY_TYPE_"): value
        for name, value in energy_pb2.EnergyType.items()
        if value != energy_pb2.ENERGY_TYPE_UNSPECIFIED
    }
)


class ProfileError(ValueError):
    """A profile file that cannot be used; the message says where and why."""


def parse_duration(text: str) -> timedelta:
    """Parses the ISO 8601 subset `PnDTnHnMnS` (e.g. `PT1S`, `PT15M`, `P1DT12H`)."""
    match = _DURATION.fullmatch(text.strip().upper())
    if match is None or not any(match.groups()) or text.strip().upper().endswith("T"):
        raise ValueError(f"expected an ISO 8601 duration like PT1S, PT15M or PT1H, got {text!r}")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def to_micros(value: datetime | timedelta) -> int:
    """Microseconds of a duration, or since the epoch of an aware datetime."""
    if isinstance(value, datetime):
        value = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds


@dataclass(frozen=True, eq=False)
class Source:
    """One meter or sensor of the household."""

    energy_type: int  # an `energy_pb2.EnergyType` value
    interval: timedelta  # native reading interval
    available_since: datetime  # aware, UTC
    data_tags: Mapping[str, str]  # OBIS code -> unit


@dataclass(frozen=True, eq=False)
class Profile:
    """The household: where it is, its seed, and its sources."""

    region: str  # upper case, e.g. `AT-9`
    seed: int
    sources: tuple[Source, ...]
    name: str = ""
    description: str = ""
    path: Path | None = None


def _fail(where: str, message: str) -> ProfileError:
    return ProfileError(f"{where}: {message}")


def _parse_time(value: Any, where: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("z", "Z"))
        except ValueError:
            raise _fail(
                where, f"expected an RFC 3339 time like 2024-03-01T00:00:00Z, got {value!r}"
            ) from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise _fail(where, "expected an RFC 3339 time with a zone, like 2024-03-01T00:00:00Z")
    return value.astimezone(UTC)


def _parse_tags(value: Any, where: str) -> Mapping[str, str]:
    if not isinstance(value, dict) or not value:
        raise _fail(where, 'expected a non-empty table of tag = "unit", e.g. { "1-0:1.8.0" = "kWh" }')
    for tag, unit in value.items():
        if not _TAG.fullmatch(tag):
            raise _fail(f"{where}.{tag!r}", "expected an OBIS code like 1-0:1.8.0")
        if not isinstance(unit, str) or not unit.strip():
            raise _fail(f"{where}.{tag!r}", 'expected a unit string such as "kWh" or "W"')
    return MappingProxyType({tag: unit.strip() for tag, unit in value.items()})


def _parse_source(raw: Any, where: str) -> Source:
    if not isinstance(raw, dict):
        raise _fail(where, "expected a table ([[sources]])")
    unknown = sorted(set(raw) - _SOURCE_KEYS)
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_SOURCE_KEYS))}")
    missing = sorted(_SOURCE_KEYS - set(raw))
    if missing:
        raise _fail(where, f"missing key(s) {', '.join(missing)}")
    kind = raw["energy_type"]
    name = kind.strip().upper().removeprefix("ENERGY_TYPE_") if isinstance(kind, str) else ""
    if name not in ENERGY_TYPES:
        raise _fail(f"{where}.energy_type", f"expected one of {', '.join(ENERGY_TYPES)}, got {kind!r}")
    try:
        interval = parse_duration(raw["interval"]) if isinstance(raw["interval"], str) else None
    except ValueError as exc:
        raise _fail(f"{where}.interval", str(exc)) from None
    if interval is None or interval <= timedelta(0):
        raise _fail(f"{where}.interval", 'expected a positive ISO 8601 duration string like "PT15M"')
    return Source(
        energy_type=ENERGY_TYPES[name],
        interval=interval,
        available_since=_parse_time(raw["available_since"], f"{where}.available_since"),
        data_tags=_parse_tags(raw["data_tags"], f"{where}.data_tags"),
    )


def parse_profile(data: Mapping[str, Any], where: str = "profile", path: Path | None = None) -> Profile:
    """Validates the parsed TOML of one profile."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    region = data.get("region")
    if not isinstance(region, str) or not _REGION.fullmatch(region.strip()):
        raise _fail(f"{where}: region", f'expected an ISO 3166 code like "AT" or "AT-9", got {region!r}')
    seed = data.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"{where}: seed", f"expected an integer, got {seed!r}")
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        raise _fail(f"{where}: sources", "expected at least one [[sources]] table")
    for key in ("name", "description"):
        if not isinstance(data.get(key, ""), str):
            raise _fail(f"{where}: {key}", "expected a string")
    return Profile(
        region=region.strip().upper(),
        seed=seed,
        sources=tuple(_parse_source(raw, f"{where}: sources[{i}]") for i, raw in enumerate(sources)),
        name=str(data.get("name", "")) or (path.stem if path else ""),
        description=str(data.get("description", "")),
        path=path,
    )


def load_profile(path: Path) -> Profile:
    """Reads and validates one profile file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    return parse_profile(data, str(path), path)


def load_profiles(paths: Iterable[Path]) -> list[Profile]:
    """Loads every file given; a directory contributes its `*.toml` files in name order."""
    profiles: list[Profile] = []
    for path in paths:
        if path.is_dir():
            files = sorted(path.glob("*.toml"))
            if not files:
                raise ProfileError(f"{path}: directory holds no *.toml profiles")
            profiles.extend(load_profile(f) for f in files)
        else:
            profiles.append(load_profile(path))
    if not profiles:
        raise ProfileError("no profile given")
    return profiles


def shipped_profiles_dir() -> Path:
    """The directory of the example profiles shipped with the package."""
    return Path(str(resources.files("aiida_stub") / "profiles"))
