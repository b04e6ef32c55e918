"""The MQTT data path with the real Mosquitto: the AIIDA stub publishes on EDDIE's topics, the sink ingests.

The AIIDA stub and the sink run in process against test doubles of the
marketplace (the sink's serves the key the sink tokens are signed with); every
MQTT message goes through a real broker.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import grpc

from eddie.aiida.v1 import aiida_pb2
from eddie_common import tokens
from eddie_common.mqtt import data_topic, parse_broker_uri, publish_properties, status_topic
from eddie_sink.mqtt import MqttIngest
from tests.support.expect import eventually, expect_error
from tests.support.mqtt import PrivateBroker, unique_permission
from tests.support.sink import ISSUER, RunningSink, sink_config, start_fake_marketplace, start_sink
from tests.support.sink import FakeMarketplace as SinkMarketplace
from tests.support.stub import FakeMarketplace as AiidaMarketplace
from tests.support.stub import RunningStub, start_marketplace, start_stub, stub_config
from tests.support.stub_messages import S, configure, data_access, data_need

State = aiida_pb2.DataAccess.State
TAGS = ("1-0:1.8.0", "1-0:1.7.0")


@dataclass
class Setup:
    stub: RunningStub
    sink: RunningSink
    keys: SinkMarketplace  # signs the sink tokens the sink accepts

    @property
    def ingest(self) -> MqttIngest:
        assert self.sink.app.mqtt is not None
        return self.sink.app.mqtt

    async def configure(self, permission_id: str, broker: str, **kwargs: Any) -> None:
        access = data_access(permission_id, broker, sink_token=self.keys.sink_token(permission_id), **kwargs)
        await self.stub.aiida.ConfigureDataAccess(configure(access), metadata=self.stub.metadata())

    async def state(self, permission_id: str) -> int:
        request = aiida_pb2.GetDataAccessRequest(permission_id=permission_id)
        access = await self.stub.aiida.GetDataAccess(request, metadata=self.stub.metadata())
        return int(access.state)

    async def listed(self, permission_id: str, *, unknown_ok: bool = True) -> set[tuple[str, int]]:
        """The (tag, time) of the permission's stored readings; none yet for a permission not seen yet."""
        try:
            readings = await self.sink.list_all(self.keys.access_token(), permission_id)
        except grpc.aio.AioRpcError as exc:
            if unknown_ok and exc.code() == grpc.StatusCode.NOT_FOUND:
                return set()
            raise
        return {(r.data_tag, r.time.ToMicroseconds()) for r in readings}


@asynccontextmanager
async def running(tmp_path: Path, broker: str, time_scale: float) -> AsyncIterator[Setup]:
    keys = await start_fake_marketplace()
    # A short session: the shared broker need not queue data for this test's sink for a week.
    sink = await start_sink(sink_config(tmp_path, keys.address, mqtt_url=broker, mqtt_session_expiry=30))
    assert sink.app.mqtt is not None
    await asyncio.wait_for(sink.app.mqtt.connected.wait(), 10)
    marketplace: AiidaMarketplace = await start_marketplace()
    stub = await start_stub(stub_config(tmp_path, marketplace, time_scale=time_scale), marketplace)
    try:
        yield Setup(stub, sink, keys)
    finally:
        await stub.close()
        await marketplace.server.stop(0)
        await sink.close()
        await keys.server.stop(0)


async def test_readings_of_an_mqtt_access_reach_the_sink_and_list_readings(
    tmp_path: Path, broker: str, observe: Any
) -> None:
    permission = unique_permission()
    observer = await observe(permission)
    async with running(tmp_path, broker, time_scale=3600.0) as setup:
        await setup.configure(permission, broker, need=data_need(TAGS, min_s=60), window_s=1800)
        await eventually(lambda: _is(setup, permission, State.STATE_FULFILLED), 20, "the window ends")
        await eventually(lambda: _has_status(observer, "FULFILLED"), 5, "FULFILLED published")
        published = {
            (value["dataTag"], _micros(m.payload["timestamp"]))
            for m in observer.data()
            for value in m.payload["values"]
        }
        listed = await eventually(
            lambda: _listed_all(setup, permission, published), 10, "all readings listed"
        )
        assert listed == published
    # EDDIE's raw record, only the requested tags, one record per reading time, not retained.
    data = observer.data()
    assert {m.topic for m in data} == {f"aiida/v1/{permission}/data/outbound/smart-meter-p1-raw"}
    assert not any(m.retain for m in data)
    for m in data:
        assert set(m.payload) == {"timestamp", "permissionId", "values"}
        assert m.payload["permissionId"] == permission
        assert all(set(v) == {"dataTag", "value", "unitOfMeasurement"} for v in m.payload["values"])
    times = sorted({t for _, t in published})
    assert {b - a for a, b in itertools.pairwise(times)} == {60 * S}, "one record per minute of the window"
    assert {tag for tag, t in published if t > times[0]} == set(TAGS)
    assert observer.statuses() == ["ACTIVE", "FULFILLED"]
    status = next(m for m in observer.messages if m.topic == status_topic(permission))
    assert set(status.payload) == {"permissionId", "status", "timestamp"}


async def test_forged_foreign_expired_and_malformed_messages_are_not_stored(
    tmp_path: Path, broker: str
) -> None:
    mine, other = unique_permission(), unique_permission()
    async with running(tmp_path, broker, time_scale=1.0) as setup:
        keys = setup.keys
        forger = tokens.TokenIssuer(tokens.SigningKey.generate(), ISSUER)
        forged, _ = forger.issue(
            f"permissions/{mine}", tokens.AUDIENCE_SINK, 300, permission_id=mine, eligible_party="accounts/x"
        )
        sent = [
            (keys.sink_token(other), _record(mine, 1)),  # a valid token of another permission
            (forged, _record(mine, 2)),  # signed by a key the marketplace never had
            (keys.sink_token(mine, ttl=-120), _record(mine, 3)),  # expired
            (None, _record(mine, 4)),  # no token
            (keys.sink_token(mine), b"{not json"),
            (keys.sink_token(mine), _record(mine, 5, tag="bogus")),
            (keys.sink_token(mine), _record(other, 6)),  # record of another permission on my topic
            (keys.sink_token(mine), _record(mine, 7)),  # the only good one
        ]
        host, port = "127.0.0.1", parse_broker_uri(broker).port
        async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            for token, payload in sent:
                properties = publish_properties(token) if token is not None else None
                await client.publish(data_topic(mine), payload, qos=1, properties=properties)
        await eventually(lambda: _counted(setup, len(sent)), 10, "every message handled")
        good = {("1-0:1.8.0", (1_700_000_000 + 7) * S)}
        assert await eventually(lambda: _listed_all(setup, mine, good), 5, "the good record stored") == good
        await expect_error(
            setup.listed(other, unknown_ok=False), grpc.StatusCode.NOT_FOUND
        )  # never stored at all
        assert setup.ingest.stored == 1
        assert setup.ingest.dropped == {
            "TOKEN_OF_ANOTHER_PERMISSION": 1,
            "TOKEN_UNKNOWN_KEY": 1,
            "TOKEN_EXPIRED": 1,
            "TOKEN_MISSING": 1,
            "MALFORMED_JSON": 1,
            "INVALID_READING": 1,
            "PERMISSION_MISMATCH": 1,
        }


async def test_revocation_publishes_revoked_and_stops_the_data_within_a_second(
    tmp_path: Path, broker: str, observe: Any
) -> None:
    permission = unique_permission()
    observer = await observe(permission)
    async with running(tmp_path, broker, time_scale=600.0) as setup:  # a record every 0.1 s
        await setup.configure(permission, broker, window_s=86400)
        await eventually(lambda: _data_count(observer, 5), 10, "data flows")
        revoked_at = time.monotonic()
        request = aiida_pb2.RevokeDataAccessRequest(permission_id=permission, reason="customer said no")
        await setup.stub.aiida.RevokeDataAccess(request, metadata=setup.stub.metadata())
        await eventually(lambda: _has_status(observer, "REVOKED"), 1.0, "REVOKED within 1 s")
        await asyncio.sleep(1.5)
        late = [m for m in observer.data() if m.at > revoked_at + 1.0]
        assert not late, f"{len(late)} records more than 1 s after the revocation"
        assert observer.statuses() == ["ACTIVE", "REVOKED"]
        assert await setup.state(permission) == State.STATE_REVOKED
    assert await _retained_status(broker, permission) == "REVOKED"


async def test_terminate_command_ends_the_access(tmp_path: Path, broker: str, observe: Any) -> None:
    permission = unique_permission()
    observer = await observe(permission)
    async with running(tmp_path, broker, time_scale=600.0) as setup:
        await setup.configure(permission, broker, window_s=86400)
        await eventually(lambda: _data_count(observer, 3), 10, "data flows")
        async with aiomqtt.Client("127.0.0.1", parse_broker_uri(broker).port) as eddie:
            command = {"action": "TERMINATE", "permissionId": permission, "regionConnectorId": "aiida"}
            await eddie.publish(f"aiida/v1/{permission}/command/terminate", json.dumps(command), qos=1)
        await eventually(lambda: _is(setup, permission, State.STATE_TERMINATED), 5, "access terminated")
        await eventually(lambda: _has_status(observer, "EXTERNALLY_TERMINATED"), 2, "status published")
        settled = len(observer.data())
        await asyncio.sleep(0.8)
        assert len(observer.data()) == settled, "records kept coming after TERMINATE"
    assert await _retained_status(broker, permission) == "EXTERNALLY_TERMINATED"


async def test_a_broker_restart_loses_nothing_inside_the_buffer(
    tmp_path: Path, private_broker: PrivateBroker
) -> None:
    permission = unique_permission()
    # 1,800 s of one-minute records at 900x: two seconds of wall time, the broker away for one of them.
    async with running(tmp_path, private_broker.uri, time_scale=900.0) as setup:
        start = (int(time.time()) - 1) * S
        await setup.configure(permission, private_broker.uri, start_us=start, window_s=1800)
        await eventually(lambda: _listed_any(setup, permission), 10, "first readings stored")
        private_broker.stop()
        await asyncio.sleep(1.0)
        private_broker.start()
        await eventually(lambda: _is(setup, permission, State.STATE_FULFILLED), 30, "the window ends")
        expected = {("1-0:1.8.0", start)} | {
            (tag, start + minute * 60 * S) for minute in range(1, 31) for tag in TAGS
        }
        try:
            await eventually(lambda: _listed_all(setup, permission, expected), 20, "every reading stored")
        finally:
            listed = await setup.listed(permission)
            missing = sorted((t - start) // S for _, t in expected - listed)
            assert listed == expected, f"missing readings at seconds {missing}"


# -- helpers -------------------------------------------------------------------------------------


def _record(permission_id: str, second: int, tag: str = "1-0:1.8.0") -> bytes:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_700_000_000 + second))
    values = [{"dataTag": tag, "value": "1.5", "unitOfMeasurement": "kWh"}]
    return json.dumps({"timestamp": stamp, "permissionId": permission_id, "values": values}).encode()


def _micros(stamp: str) -> int:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromJsonString(stamp)
    return ts.ToMicroseconds()


async def _is(setup: Setup, permission_id: str, state: int) -> bool:
    return await setup.state(permission_id) == state


async def _has_status(observer: Any, status: str) -> bool:
    return status in observer.statuses()


async def _data_count(observer: Any, count: int) -> bool:
    return len(observer.data()) >= count


async def _counted(setup: Setup, count: int) -> bool:
    return setup.ingest.messages >= count


async def _listed_any(setup: Setup, permission_id: str) -> bool:
    return bool(await setup.listed(permission_id))


async def _listed_all(
    setup: Setup, permission_id: str, expected: set[tuple[str, int]]
) -> set[tuple[str, int]]:
    listed = await setup.listed(permission_id)
    return listed if listed >= expected else set()


async def _retained_status(broker: str, permission_id: str) -> str:
    """What a subscriber arriving now learns from the retained status message."""
    async with aiomqtt.Client("127.0.0.1", parse_broker_uri(broker).port) as client:
        await client.subscribe(status_topic(permission_id), qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return str(json.loads(message.payload)["status"])
    raise AssertionError("no retained status")


def test_sink_token_property_round_trip() -> None:
    from eddie_common.mqtt import authorization_of

    assert authorization_of(publish_properties("abc")) == "abc"
    assert authorization_of(None) == ""
