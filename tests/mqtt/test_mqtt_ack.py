"""The sink acknowledges an MQTT reading (QoS 1 PUBACK) only once it is committed.

A real sink process on a private Mosquitto that logs every packet. The test holds
the sink's database write lock, so the readings arrive but cannot be committed;
the broker must see no PUBACK for them. Then the sink is killed (SIGKILL: a crash
between receipt and commit) and started again on the same data directory and MQTT
session: the broker sends the unacknowledged messages again, and every reading is
stored exactly once. A sink that acknowledged on receipt would lose them here.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import grpc
import pytest

from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie_client import procs
from eddie_common.mqtt import data_topic, publish_properties
from tests.support.expect import eventually
from tests.support.mqtt import PrivateBroker, free_port, unique_permission
from tests.support.sink import FakeMarketplace, start_fake_marketplace

pytestmark = pytest.mark.e2e

READINGS = 20
T0 = 1_700_000_000


@pytest.fixture
def chatty_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A private Mosquitto that logs every packet (PUBLISH sent, PUBACK received) to its log file."""
    import shutil

    if shutil.which("mosquitto") is None:
        pytest.skip("the mosquitto binary is not installed (this test runs its own broker)")
    broker = PrivateBroker(tmp_path / "broker", free_port(), extra_config="log_type all")
    broker.directory.mkdir()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def keys() -> AsyncIterator[FakeMarketplace]:
    marketplace = await start_fake_marketplace()
    yield marketplace
    await marketplace.server.stop(0)


def _record(permission_id: str, second: int) -> bytes:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + second))
    values = [{"dataTag": "1-0:1.8.0", "value": second, "unitOfMeasurement": "kWh"}]
    return json.dumps({"timestamp": stamp, "permissionId": permission_id, "values": values}).encode()


async def _publish(broker: PrivateBroker, keys: FakeMarketplace, permission_id: str, seconds: range) -> None:
    """QoS 1 publishes, each acknowledged by the broker (not by the sink) before the next."""
    properties = publish_properties(keys.sink_token(permission_id))
    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for second in seconds:
            record = _record(permission_id, second)
            await client.publish(data_topic(permission_id), record, qos=1, properties=properties)


async def _stored(sink: procs.Proc, keys: FakeMarketplace, permission_id: str) -> list[int]:
    """The seconds of the permission's stored readings, every page, in order."""
    seconds: list[int] = []
    async with grpc.aio.insecure_channel(sink.address) as channel:
        stub = data_sink_pb2_grpc.DataSinkServiceStub(channel)
        page_token = ""
        while True:
            try:
                response = await stub.ListReadings(
                    data_sink_pb2.ListReadingsRequest(permission_id=permission_id, page_token=page_token),
                    metadata=(("authorization", f"Bearer {keys.access_token()}"),),
                    timeout=5,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:  # nothing stored for it yet
                    return []
                raise
            seconds += [r.time.seconds - T0 for r in response.readings]
            page_token = response.next_page_token
            if not page_token:
                return seconds


def _sink_packets(broker: PrivateBroker, kind: str) -> int:
    """How many PUBLISHes the broker sent to a sink (`Sending PUBLISH to`) or PUBACKs it got from one."""
    pattern = {"publish": "Sending PUBLISH to", "puback": "Received PUBACK from"}[kind]
    return len(re.findall(f"{pattern} eddie-sink-", broker.log))


async def test_a_reading_is_acknowledged_only_once_committed_and_survives_a_crash_before_the_commit(
    tmp_path: Path, chatty_broker: PrivateBroker, keys: FakeMarketplace
) -> None:
    permission = unique_permission()
    data_dir = tmp_path / "sink"
    flags = ("--mqtt-url", chatty_broker.uri)

    def start() -> procs.Proc:
        return procs.start_sink(keys.address, data_dir, tmp_path, *flags, name="sink")

    sink = await asyncio.to_thread(start)
    try:
        # Warm up: the sink is subscribed, has the keys and has recorded the permission.
        await _publish(chatty_broker, keys, permission, range(1))
        await eventually(lambda: _has(sink, keys, permission, 1), 20, "the first reading stored")
        await eventually(lambda: _packets_at_least(chatty_broker, "puback", 1), 5, "the first one acked")

        lock = sqlite3.connect(data_dir / "readings.db", isolation_level=None, timeout=10)
        try:
            lock.execute("BEGIN IMMEDIATE")  # the sink's writer now waits for the database
            await _publish(chatty_broker, keys, permission, range(1, READINGS + 1))
            await eventually(
                lambda: _packets_at_least(chatty_broker, "publish", READINGS + 1), 10, "all sent to the sink"
            )
            await asyncio.sleep(1.0)  # time enough for a sink that acks on receipt to do so
            assert _sink_packets(chatty_broker, "puback") == 1, "a PUBACK before the reading was committed"
            assert await _stored(sink, keys, permission) == [0]
            sink.kill()  # SIGKILL: received, not committed, not acknowledged
        finally:
            lock.execute("ROLLBACK")
            lock.close()

        sink = await asyncio.to_thread(start)  # the same data dir: the same MQTT client id and session
        await eventually(lambda: _has(sink, keys, permission, READINGS + 1), 20, "every reading stored")
        assert await _stored(sink, keys, permission) == list(range(READINGS + 1)), "each reading exactly once"
        # Redelivered, committed, and now acknowledged: nothing is left for the broker to send again.
        await eventually(
            lambda: _packets_at_least(chatty_broker, "puback", READINGS + 1), 10, "the redelivered ones acked"
        )
    finally:
        await asyncio.to_thread(sink.stop)


async def _has(sink: procs.Proc, keys: FakeMarketplace, permission_id: str, count: int) -> bool:
    return len(await _stored(sink, keys, permission_id)) >= count


async def _packets_at_least(broker: PrivateBroker, kind: str, count: int) -> bool:
    return _sink_packets(broker, kind) >= count
