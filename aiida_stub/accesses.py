"""Validation of ConfigureDataAccess input and the stream plan of an access."""

from __future__ import annotations

import re
from datetime import timedelta

from aiida_stub.profile import Profile, Source, to_micros
from aiida_stub.state import AccessRecord
from aiida_stub.streamer import StreamPlan
from eddie.aiida.v1 import aiida_pb2
from eddie_common.cli import split_host_port
from eddie_common.errors import Validator

PERMISSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
SINK_SCHEMES = ("grpc://", "grpcs://", "mqtt://", "mqtts://")


def valid_sink_uri(uri: str) -> bool:
    """`grpc://host:port` or `grpcs://host:port` (DataSinkService), `mqtt://` or `mqtts://` (MQTT broker)."""
    for scheme in SINK_SCHEMES:
        if uri.startswith(scheme):
            try:
                host, _ = split_host_port(uri.removeprefix(scheme))
            except ValueError:
                return False
            return bool(host) and "/" not in host
    return False


def validate_data_access(access: aiida_pb2.DataAccess, has_access: bool) -> None:
    """Raises INVALID_ARGUMENT naming every bad field of a ConfigureDataAccessRequest."""
    v = Validator()
    if not has_access:
        v.add("data_access", "required")
        v.raise_if_any()
    v.check(
        bool(PERMISSION_ID.fullmatch(access.permission_id)),
        "data_access.permission_id",
        "required: 1-128 of [A-Za-z0-9_-]",
    )
    v.check(
        valid_sink_uri(access.sink_uri),
        "data_access.sink_uri",
        "expected grpc://, grpcs://, mqtt:// or mqtts:// host:port",
    )
    v.check(bool(access.sink_token), "data_access.sink_token", "required")
    v.check(access.HasField("data_need"), "data_access.data_need", "required")
    has_times = v.check(access.HasField("start_time"), "data_access.start_time", "required")
    has_times &= v.check(access.HasField("end_time"), "data_access.end_time", "required")
    if has_times:
        v.check(
            access.end_time.ToMicroseconds() > access.start_time.ToMicroseconds(),
            "data_access.end_time",
            "must be after start_time",
        )
    v.raise_if_any()


def stream_plan(profile: Profile, access: AccessRecord, source_index: int) -> StreamPlan:
    """Readings of the requested tags (every tag of the source if none) at max(interval, min_granularity)."""
    source: Source = profile.sources[source_index]
    need = access.data_need
    min_us = to_micros(
        timedelta(seconds=need.min_granularity.seconds, microseconds=need.min_granularity.nanos // 1000)
    )
    tags = tuple(dict.fromkeys(need.data_tags)) or tuple(source.data_tags)
    return StreamPlan(source, tags, max(to_micros(source.interval), min_us))
