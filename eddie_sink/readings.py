"""Readings as the sink stores them, their validation, and proto conversion."""

from __future__ import annotations

import json
import math
import re
from typing import NamedTuple

from google.protobuf import timestamp_pb2

from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2
from eddie_common.errors import InvalidArgument, PermissionDenied, Validator

# OBIS-like `A-B:C.D.E` with an optional `*F`; value groups C..E may be letters (e.g. `C.1.0`).
DATA_TAG_PATTERN = re.compile(
    r"[0-9]{1,3}-[0-9]{1,3}:[0-9A-Z]{1,3}\.[0-9A-Z]{1,3}\.[0-9A-Z]{1,3}(\*[0-9]{1,3})?"
)
MAX_DATA_TAG_LENGTH = 64
MAX_UNIT_LENGTH = 16
# Times are stored as int64 nanoseconds since the epoch: 1970-01-01 .. 2262-04-11.
MAX_SECONDS = 9_223_372_035
NANOS_PER_SECOND = 1_000_000_000


class StoredReading(NamedTuple):
    """One reading row; `time_ns` is nanoseconds since the Unix epoch (UTC)."""

    permission_id: str
    data_tag: str
    time_ns: int
    value: float
    unit: str

    def to_proto(self) -> energy_pb2.Reading:
        seconds, nanos = divmod(self.time_ns, NANOS_PER_SECOND)
        return energy_pb2.Reading(
            permission_id=self.permission_id,
            data_tag=self.data_tag,
            value=self.value,
            unit=self.unit,
            time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
        )

    def to_json_line(self) -> str:
        seconds, nanos = divmod(self.time_ns, NANOS_PER_SECOND)
        time = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToJsonString()
        record = {
            "permission_id": self.permission_id,
            "data_tag": self.data_tag,
            "value": self.value,
            "unit": self.unit,
            "time": time,
        }
        return json.dumps(record, separators=(",", ":"))


def accept_reading(request: data_sink_pb2.PublishRequest, permission_id: str) -> StoredReading:
    """The reading of a Publish message of `permission_id`'s stream, or the error to fail it with."""
    if not request.HasField("reading"):
        raise InvalidArgument.for_field("reading", "required")
    reading = request.reading
    if reading.permission_id != permission_id:
        raise PermissionDenied(
            "reading.permission_id: not the permission of the sink token", reason="PERMISSION_MISMATCH"
        )
    # This runs once per reading: one cheap test for the common case, details only on failure.
    tag, unit, value = reading.data_tag, reading.unit, reading.value
    has_time = reading.HasField("time")
    seconds, nanos = (reading.time.seconds, reading.time.nanos) if has_time else (0, 0)
    if not (
        len(tag) <= MAX_DATA_TAG_LENGTH
        and DATA_TAG_PATTERN.fullmatch(tag) is not None
        and len(unit) <= MAX_UNIT_LENGTH
        and unit.isprintable()
        and math.isfinite(value)
        and has_time
        and 0 <= seconds <= MAX_SECONDS
        and 0 <= nanos < NANOS_PER_SECOND
    ):
        raise_violations(reading)
    return StoredReading(permission_id, tag, seconds * NANOS_PER_SECOND + nanos, value, unit)


def raise_violations(reading: energy_pb2.Reading) -> None:
    """Raises INVALID_ARGUMENT naming every invalid field of `reading`."""
    check = Validator()
    tag = reading.data_tag
    check.check(
        len(tag) <= MAX_DATA_TAG_LENGTH and DATA_TAG_PATTERN.fullmatch(tag) is not None,
        "reading.data_tag",
        "must be an OBIS code A-B:C.D.E of at most 64 characters",
    )
    check.check(
        len(reading.unit) <= MAX_UNIT_LENGTH and reading.unit.isprintable(),
        "reading.unit",
        "at most 16 printable characters",
    )
    check.check(math.isfinite(reading.value), "reading.value", "must be a finite number")
    if check.check(reading.HasField("time"), "reading.time", "required"):
        time = reading.time
        check.check(
            0 <= time.seconds <= MAX_SECONDS and 0 <= time.nanos < NANOS_PER_SECOND,
            "reading.time",
            "must lie between 1970 and 2262",
        )
    check.raise_if_any()
