"""Publish: readings of the token's permission are stored once, anything else fails the stream."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2
from eddie_common.interceptors import error_info
from tests.support.expect import expect_error
from tests.support.sink import FakeMarketplace, RunningSink, bearer, reading


async def test_published_readings_are_listed_oldest_first(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    readings = [reading(s, tag, value=s) for s in range(10) for tag in ("1-0:2.8.0", "1-0:1.8.0")]
    random.Random(1).shuffle(readings)

    accepted = await sink.publish(fake_marketplace.sink_token(), readings)

    assert accepted == 20
    listed = await sink.list_all(fake_marketplace.access_token())
    keys = [(r.time.seconds, r.data_tag) for r in listed]
    assert keys == sorted((r.time.seconds, r.data_tag) for r in readings)
    assert listed[0].permission_id == "perm-1"
    assert listed[0].unit == "kWh"


async def test_duplicate_readings_are_stored_once(sink: RunningSink, fake_marketplace: FakeMarketplace):
    token = fake_marketplace.sink_token()
    batch = [reading(1), reading(2), reading(1)]

    assert await sink.publish(token, batch) == 3
    assert await sink.publish(token, batch) == 3

    listed = await sink.list_all(fake_marketplace.access_token())
    assert [r.time.seconds - 1_700_000_000 for r in listed] == [1, 2]


async def test_reading_of_another_permission_is_denied_and_not_stored(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    other_token = fake_marketplace.sink_token("perm-2")
    await sink.publish(other_token, [reading(100, permission_id="perm-2")])
    stream = [reading(1), reading(2), reading(3, permission_id="perm-2"), reading(4)]

    err = await expect_error(
        sink.publish(fake_marketplace.sink_token(), stream),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_MISMATCH",
    )

    info = error_info(err)
    assert info is not None
    assert (info.reason, info.domain) == ("PERMISSION_MISMATCH", "framework.eddie")
    access = fake_marketplace.access_token()
    assert [r.time.seconds - 1_700_000_000 for r in await sink.list_all(access)] == [1, 2]
    assert [r.time.seconds - 1_700_000_000 for r in await sink.list_all(access, "perm-2")] == [100]


def _without_time() -> energy_pb2.Reading:
    r = reading(1)
    r.ClearField("time")
    return r


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (reading(1, data_tag="energy"), "reading.data_tag"),
        (reading(1, data_tag="1-0:1.8.0" + "0" * 60), "reading.data_tag"),
        (reading(1, value=math.nan), "reading.value"),
        (reading(1, value=math.inf), "reading.value"),
        (reading(1, unit="k" * 17), "reading.unit"),
        (_without_time(), "reading.time"),
    ],
)
async def test_invalid_reading_fails_the_stream(
    sink: RunningSink, fake_marketplace: FakeMarketplace, bad: energy_pb2.Reading, field: str
):
    await expect_error(
        sink.publish(fake_marketplace.sink_token(), [reading(0), bad]),
        grpc.StatusCode.INVALID_ARGUMENT,
        field=field,
    )

    listed = await sink.list_all(fake_marketplace.access_token())
    assert [r.time.seconds - 1_700_000_000 for r in listed] == [0]


async def test_message_without_reading_is_invalid(sink: RunningSink, fake_marketplace: FakeMarketplace):
    call = sink.stub.Publish(
        iter([data_sink_pb2.PublishRequest()]), metadata=bearer(fake_marketplace.sink_token())
    )
    await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, field="reading")


async def test_jsonl_file_gets_one_line_per_new_reading(sink: RunningSink, fake_marketplace: FakeMarketplace):
    token = fake_marketplace.sink_token()
    await sink.publish(token, [reading(1, value=2.5), reading(2, "1-0:1.7.0", value=300, unit="W")])
    await sink.publish(token, [reading(1, value=2.5)])

    assert sink.config.jsonl is not None
    lines = [json.loads(line) for line in sink.config.jsonl.read_text().splitlines()]
    assert lines == [
        {
            "permission_id": "perm-1",
            "data_tag": "1-0:1.8.0",
            "value": 2.5,
            "unit": "kWh",
            "time": "2023-11-14T22:13:21Z",
        },
        {
            "permission_id": "perm-1",
            "data_tag": "1-0:1.7.0",
            "value": 300.0,
            "unit": "W",
            "time": "2023-11-14T22:13:22Z",
        },
    ]


async def test_reading_is_visible_soon_after_arrival_on_an_open_stream(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    sent = asyncio.Event()
    done = asyncio.Event()

    async def requests():
        yield data_sink_pb2.PublishRequest(reading=reading(1))
        sent.set()
        await done.wait()

    call = sink.stub.Publish(requests(), metadata=bearer(fake_marketplace.sink_token()))
    await sent.wait()
    started = time.monotonic()
    access = fake_marketplace.access_token()
    while not (await sink.list_page(access)).readings:
        assert time.monotonic() - started < 1.0, "reading not visible within 1 s"
        await asyncio.sleep(0.002)
    done.set()
    assert (await call).accepted == 1


async def test_many_concurrent_streams_are_all_stored(sink: RunningSink, fake_marketplace: FakeMarketplace):
    async def publish(n: int) -> int:
        pid = f"perm-c{n}"
        return await sink.publish(
            fake_marketplace.sink_token(pid), [reading(s, permission_id=pid) for s in range(50)]
        )

    assert await asyncio.gather(*(publish(n) for n in range(20))) == [50] * 20
    listed = await sink.list_all(fake_marketplace.access_token(), "perm-c7", page_size=1000)
    assert len(listed) == 50


async def test_nanosecond_times_round_trip(sink: RunningSink, fake_marketplace: FakeMarketplace):
    r = reading(0)
    r.time.CopyFrom(timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789))
    await sink.publish(fake_marketplace.sink_token(), [r])
    [listed] = await sink.list_all(fake_marketplace.access_token())
    assert listed == r
