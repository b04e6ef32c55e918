"""Builders for data needs and data accesses, and a Connect stream reader."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from eddie.aiida.v1 import aiida_pb2
from eddie.energy.v1 import energy_pb2

S = 1_000_000


def duration(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


def timestamp(micros: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def data_need(
    tags: tuple[str, ...] = ("1-0:1.8.0", "1-0:1.7.0"),
    energy_type: int = energy_pb2.ENERGY_TYPE_ELECTRICITY,
    min_s: int = 60,
    max_s: int = 900,
    regions: tuple[str, ...] = (),
    history_s: int = 0,
) -> energy_pb2.DataNeed:
    return energy_pb2.DataNeed(
        energy_type=energy_type,  # type: ignore[arg-type]
        data_tags=list(tags),
        min_granularity=duration(min_s),
        max_granularity=duration(max_s),
        history=duration(history_s),
        duration=duration(86400),
        regions=list(regions),
    )


def data_access(
    permission_id: str,
    sink_uri: str,
    *,
    need: energy_pb2.DataNeed | None = None,
    start_us: int | None = None,
    window_s: int = 3600,
    sink_token: str = "sink-token",
) -> aiida_pb2.DataAccess:
    start = start_us if start_us is not None else (int(time.time()) - 10) * S
    return aiida_pb2.DataAccess(
        permission_id=permission_id,
        data_need=need if need is not None else data_need(),
        sink_uri=sink_uri,
        sink_token=sink_token,
        start_time=timestamp(start),
        end_time=timestamp(start + window_s * S),
    )


def configure(access: aiida_pb2.DataAccess) -> aiida_pb2.ConfigureDataAccessRequest:
    return aiida_pb2.ConfigureDataAccessRequest(data_access=access)


async def read_until(call: Any, predicate: Any, timeout: float = 10.0) -> list[aiida_pb2.ConnectResponse]:
    """Reads messages until one satisfies `predicate`; returns everything read."""
    seen: list[aiida_pb2.ConnectResponse] = []

    async def reader() -> None:
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF, f"stream ended; saw {seen}"
            seen.append(message)
            if predicate(message):
                return

    await asyncio.wait_for(reader(), timeout)
    return seen


def status_of(permission_id: str, state: int) -> Any:
    def predicate(message: aiida_pb2.ConnectResponse) -> bool:
        status = message.data_access_status
        return (
            message.WhichOneof("message") == "data_access_status"
            and status.permission_id == permission_id
            and status.state == state
        )

    return predicate
