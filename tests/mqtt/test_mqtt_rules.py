"""The small marketplace and AIIDA rules of the MQTT data path (no broker needed)."""

from __future__ import annotations

import json

import pytest

from aiida_stub.accesses import valid_sink_uri
from aiida_stub.meter import MeterReading
from aiida_stub.mqtt import is_terminate, record_json
from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import access_pb2
from eddie_common.errors import InvalidArgument
from eddie_common.mqtt import data_topic, parse_broker_uri, permission_of_data_topic
from eddie_sink.mqtt import Dropped, parse_record
from marketplace_server.services.access import validate_request_access
from marketplace_server.services.permissions import ACCEPTED, ACTIVE, TERMINATED
from marketplace_server.services.statuses import planned_move

DATA_REQUEST = "dataRequests/dr-1"


def _request(sink_uri: str) -> access_pb2.RequestAccessRequest:
    return access_pb2.RequestAccessRequest(
        data_request=DATA_REQUEST, instance_ids=["aiida-1"], sink_uri=sink_uri
    )


@pytest.mark.parametrize("uri", ["mqtt://127.0.0.1:1883", "mqtts://broker.example:8883", "grpc://sink:50061"])
def test_the_marketplace_and_the_aiida_accept_mqtt_sink_uris(uri: str) -> None:
    validate_request_access(_request(uri))
    assert valid_sink_uri(uri)


@pytest.mark.parametrize("uri", ["mqtt://broker", "mqtt://:1883", "ws://broker:80", "mqtt://b/x:1883"])
def test_bad_broker_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_request_access(_request(uri))
    assert not valid_sink_uri(uri)


def test_a_terminated_access_terminates_the_permission() -> None:
    status = aiida_pb2.DataAccessStatus(
        permission_id="p1", state=aiida_pb2.DataAccess.STATE_TERMINATED, reason="terminated by the EP"
    )
    for state in (ACCEPTED, ACTIVE):
        move = planned_move(state, status)
        assert move is not None and move.to_state == TERMINATED and move.reason == "terminated by the EP"
    assert planned_move(TERMINATED, status) is None


def test_topics_and_records_round_trip() -> None:
    assert data_topic("p1") == "aiida/v1/p1/data/outbound/smart-meter-p1-raw"
    assert permission_of_data_topic(data_topic("p1")) == "p1"
    assert permission_of_data_topic("aiida/v1/p1/status") is None
    assert permission_of_data_topic("other/v1/p1/data/outbound/x") is None
    assert parse_broker_uri("mqtts://[::1]:8883").tls
    readings = [MeterReading("1-0:1.8.0", "kWh", 12.5, 1_700_000_000_000_000)]
    payload = record_json("p1", 1_700_000_000_000_000, readings)
    assert json.loads(payload) == {
        "timestamp": "2023-11-14T22:13:20Z",
        "permissionId": "p1",
        "values": [{"dataTag": "1-0:1.8.0", "value": 12.5, "unitOfMeasurement": "kWh"}],
    }
    (stored,) = parse_record(payload, "p1")
    assert (stored.data_tag, stored.time_ns, stored.value, stored.unit) == (
        "1-0:1.8.0",
        1_700_000_000 * 10**9,
        12.5,
        "kWh",
    )


def _raw(stamp: str, values: list[dict[str, object]]) -> bytes:
    return json.dumps({"timestamp": stamp, "values": values}).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[1]", "MALFORMED_RECORD"),
        (_raw("yesterday", [{"dataTag": "1-0:1.8.0", "value": 1}]), "INVALID_TIMESTAMP"),
        (_raw("2024-01-01T00:00:00Z", []), "MALFORMED_RECORD"),
        (_raw("2024-01-01T00:00:00Z", [{"dataTag": "1-0:1.8.0", "value": "NaN"}]), "INVALID_READING"),
        (_raw("2024-01-01T00:00:00Z", [{"dataTag": "1-0:1.8.0", "value": True}]), "MALFORMED_RECORD"),
        (_raw("2024-01-01T00:00:00Z", [{"dataTag": "1.8.0", "value": 1}]), "INVALID_READING"),
    ],
)
def test_bad_records_are_dropped_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(Dropped) as dropped:
        parse_record(payload, "p1")
    assert dropped.value.reason == reason


def test_only_a_terminate_for_this_permission_terminates() -> None:
    assert is_terminate(b'{"action": "TERMINATE", "permissionId": "p1"}', "p1")
    assert is_terminate(b'{"action": "TERMINATE"}', "p1")
    assert not is_terminate(b'{"action": "TERMINATE", "permissionId": "p2"}', "p1")
    assert not is_terminate(b'{"action": "SET_TRANSMISSION_ENABLED", "permissionId": "p1"}', "p1")
    assert not is_terminate(b"TERMINATE", "p1")
