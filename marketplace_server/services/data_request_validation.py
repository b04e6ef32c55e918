"""Validation and normalization of CreateDataRequest input (every violation at once).

Field paths name the request field (`data_request.data_need.data_tags[2]`), as in
AIP-193's `BadRequest.FieldViolation.field`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from google.protobuf import duration_pb2

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import data_request_pb2
from eddie_common.errors import Validator
from marketplace_server import idempotency
from marketplace_server import text as text_rules
from marketplace_server.db.models import DataRequestKind
from marketplace_server.iso3166 import normalize_region

__all__ = ["MAX_REGIONS", "NewDataRequest", "validate_create"]

DataRequest = data_request_pb2.DataRequest

MAX_TITLE = 200
MAX_DESCRIPTION = 5000
MAX_PURPOSE = 2000
MAX_POLICY_URI = 2048
MAX_DATA_TAGS = 64
MAX_REGIONS = 64

_SECOND = 1_000_000_000  # durations are compared in nanoseconds
_DAY = 86_400 * _SECOND
_YEAR = 365 * _DAY + _DAY // 4
MAX_GRANULARITY = 31 * _DAY
MAX_HISTORY = 50 * _YEAR
MAX_DURATION = 10 * _YEAR
_DURATION_SECONDS_LIMIT = 315_576_000_000  # google.protobuf.Duration's range

_OBIS = re.compile(r"([0-9]{1,3})-([0-9]{1,3}):([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})", re.ASCII)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)


@dataclass(frozen=True)
class NewDataRequest:
    """A validated, normalized data request as its owner submitted it."""

    kind: DataRequestKind
    title: str
    description: str
    purpose: str
    policy_uri: str
    data_need: energy_pb2.DataNeed

    def canonical(self) -> data_request_pb2.DataRequest:
        """The input as a message (the content a request id stands for)."""
        return DataRequest(
            kind=self.kind,
            title=self.title,
            description=self.description,
            purpose=self.purpose,
            policy_uri=self.policy_uri,
            data_need=self.data_need,
        )


def _text(v: Validator, value: str, field: str, limit: int, *, required: bool, multi_line: bool) -> str:
    text = value.strip()
    if not text:
        v.check(not required, field, "required")
    elif len(text) > limit:
        v.add(field, f"at most {limit} characters")
    elif not (text_rules.multi_line(text) if multi_line else text_rules.single_line(text)):
        v.add(field, "must not contain control characters")
    return text


def _valid_https_uri(uri: str) -> bool:
    if not all(0x21 <= ord(c) < 0x7F for c in uri) or "\\" in uri:
        return False  # ASCII without spaces: non-ASCII must be percent-encoded
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    if parts.scheme != "https" or "@" in parts.netloc or not parts.hostname:
        return False
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(parts.hostname)
        except ValueError:
            return False
        return True
    return _HOST.fullmatch(parts.hostname) is not None and len(parts.hostname) <= 253


def _policy_uri(v: Validator, value: str, field: str) -> str:
    uri = value.strip()
    if uri:
        if len(uri) > MAX_POLICY_URI:
            v.add(field, f"at most {MAX_POLICY_URI} characters")
        elif not _valid_https_uri(uri):
            v.add(field, "must be an https:// URL with a host, no user info and no spaces")
    return uri


def _duration(v: Validator, d: duration_pb2.Duration, field: str) -> int | None:
    """The duration in nanoseconds, or None (and a violation) if it is malformed."""
    seconds, nanos = d.seconds, d.nanos
    well_formed = (
        abs(seconds) <= _DURATION_SECONDS_LIMIT
        and abs(nanos) < _SECOND
        and not (seconds > 0 and nanos < 0)
        and not (seconds < 0 and nanos > 0)
    )
    if not well_formed:
        v.add(field, "not a valid duration (seconds and nanos must share a sign, |nanos| < 1e9)")
        return None
    return seconds * _SECOND + nanos


def _in_range(v: Validator, value: int | None, field: str, low: int, high: int, rule: str) -> bool:
    return value is not None and v.check(low <= value <= high, field, rule)


def _granularities(v: Validator, need: energy_pb2.DataNeed, prefix: str) -> None:
    low = _duration(v, need.min_granularity, f"{prefix}.min_granularity")
    high = _duration(v, need.max_granularity, f"{prefix}.max_granularity")
    rule = "must be positive, at most 31 days"
    low_ok = _in_range(v, low, f"{prefix}.min_granularity", 1, MAX_GRANULARITY, rule)
    high_ok = _in_range(v, high, f"{prefix}.max_granularity", 1, MAX_GRANULARITY, rule)
    if low_ok and high_ok and low is not None and high is not None:
        v.check(high >= low, f"{prefix}.max_granularity", "must not be less than min_granularity")


def _periods(v: Validator, need: energy_pb2.DataNeed, prefix: str) -> None:
    history = _duration(v, need.history, f"{prefix}.history")
    _in_range(v, history, f"{prefix}.history", 0, MAX_HISTORY, "must not be negative, at most 50 years")
    duration = _duration(v, need.duration, f"{prefix}.duration")
    _in_range(v, duration, f"{prefix}.duration", 1, MAX_DURATION, "must be positive, at most 10 years")


def _obis_code(tag: str) -> bool:
    match = _OBIS.fullmatch(tag)
    return match is not None and all(int(group) <= 255 for group in match.groups())


def _data_tags(v: Validator, tags: list[str], field: str) -> None:
    if not tags:
        v.add(field, "at least one data tag is required")
    elif len(tags) > MAX_DATA_TAGS:
        v.add(field, f"at most {MAX_DATA_TAGS} data tags")
        return
    seen: set[str] = set()
    for i, tag in enumerate(tags):
        if not _obis_code(tag):
            v.add(f"{field}[{i}]", "must be an OBIS code A-B:C.D.E such as 1-0:1.8.0")
        elif tag in seen:
            v.add(f"{field}[{i}]", "duplicate data tag")
        seen.add(tag)


def _regions(v: Validator, regions: list[str], field: str) -> list[str]:
    if len(regions) > MAX_REGIONS:
        v.add(field, f"at most {MAX_REGIONS} regions")
        return []
    normalized: list[str] = []
    for i, code in enumerate(regions):
        region = normalize_region(code)
        if region is None:
            v.add(f"{field}[{i}]", "must be an ISO 3166-1 alpha-2 or ISO 3166-2 code such as AT or AT-9")
        elif region in normalized:
            v.add(f"{field}[{i}]", "duplicate region")
        else:
            normalized.append(region)
    return normalized


def _data_need(v: Validator, request: data_request_pb2.DataRequest, prefix: str) -> energy_pb2.DataNeed:
    if not request.HasField("data_need"):
        v.add(prefix, "required")
        return energy_pb2.DataNeed()
    need = request.data_need
    energy_types = set(energy_pb2.EnergyType.values()) - {energy_pb2.ENERGY_TYPE_UNSPECIFIED}
    v.check(need.energy_type in energy_types, f"{prefix}.energy_type", "required: a known energy type")
    _data_tags(v, list(need.data_tags), f"{prefix}.data_tags")
    _granularities(v, need, prefix)
    _periods(v, need, prefix)
    normalized = energy_pb2.DataNeed()
    normalized.CopyFrom(need)
    normalized.ClearField("regions")
    normalized.regions.extend(_regions(v, list(need.regions), f"{prefix}.regions"))
    return normalized


def validate_create(request: data_request_pb2.CreateDataRequestRequest) -> NewDataRequest:
    """The normalized input, or INVALID_ARGUMENT listing every violation."""
    v = Validator()
    idempotency.check_request_id(v, request.request_id)
    if not request.HasField("data_request"):
        v.add("data_request", "required")
        v.raise_if_any()
    dr = request.data_request
    p = "data_request"
    kind = dr.kind or DataRequest.KIND_DATA_REQUEST
    v.check(kind in DataRequest.Kind.values(), f"{p}.kind", "must be KIND_DATA_REQUEST or KIND_DATA_SERVICE")
    new = NewDataRequest(
        kind=kind,
        title=_text(v, dr.title, f"{p}.title", MAX_TITLE, required=True, multi_line=False),
        description=_text(
            v, dr.description, f"{p}.description", MAX_DESCRIPTION, required=False, multi_line=True
        ),
        purpose=_text(v, dr.purpose, f"{p}.purpose", MAX_PURPOSE, required=True, multi_line=True),
        policy_uri=_policy_uri(v, dr.policy_uri, f"{p}.policy_uri"),
        data_need=_data_need(v, dr, f"{p}.data_need"),
    )
    v.raise_if_any()
    return new
