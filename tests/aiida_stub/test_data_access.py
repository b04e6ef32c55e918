"""ConfigureDataAccess / RevokeDataAccess and the readings that reach the sink."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from aiida_stub.meter import Meter
from aiida_stub.profile import load_profile, shipped_profiles_dir
from eddie.aiida.v1 import aiida_pb2
from eddie.energy.v1 import energy_pb2
from tests.support.expect import expect_error
from tests.support.stub import FakeMarketplace, RunningSink, RunningStub, start_sink, start_stub, stub_config
from tests.support.stub_messages import S, configure, data_access, data_need, read_until, status_of

State = aiida_pb2.DataAccess.State


async def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def get(stub: RunningStub, permission_id: str) -> aiida_pb2.DataAccess:
    return await stub.aiida.GetDataAccess(
        aiida_pb2.GetDataAccessRequest(permission_id=permission_id), metadata=stub.metadata()
    )


async def revoke(
    stub: RunningStub, permission_id: str, reason: str = "revoked by the customer"
) -> aiida_pb2.DataAccess:
    return await stub.aiida.RevokeDataAccess(
        aiida_pb2.RevokeDataAccessRequest(permission_id=permission_id, reason=reason),
        metadata=stub.metadata(),
    )


async def test_configure_starts_streaming_and_never_returns_the_sink_token(
    stub: RunningStub, sink: RunningSink
) -> None:
    sink.service.tokens["p1"] = "sink-token"
    access = await stub.aiida.ConfigureDataAccess(
        configure(data_access("p1", sink.uri)), metadata=stub.metadata()
    )
    assert access.state == State.STATE_ACTIVE
    assert access.sink_token == ""
    assert access.sink_uri == sink.uri
    await asyncio.wait_for(sink.service.arrived.wait(), 10)
    listed = await stub.aiida.ListDataAccesses(aiida_pb2.ListDataAccessesRequest(), metadata=stub.metadata())
    assert [a.permission_id for a in listed.data_accesses] == ["p1"]
    assert all(a.sink_token == "" for a in listed.data_accesses)
    assert (await get(stub, "p1")).sink_token == ""


async def test_readings_have_the_requested_tags_granularity_and_values(
    stub: RunningStub, sink: RunningSink
) -> None:
    """vienna-p1 measures every second; min_granularity PT1M: one set per minute. 30 min at 3600x: 0.5 s.

    The import register also reads once at start_time: the baseline of the first minute.
    """
    sink.service.tokens["p-minute"] = "sink-token"
    start = (int(time.time()) - 5) * S
    request = data_access("p-minute", sink.uri, start_us=start, window_s=1800)
    await stub.aiida.ConfigureDataAccess(configure(request), metadata=stub.metadata())
    await wait_for(lambda: len(sink.service.unique("p-minute")) == 61)

    readings = sink.service.readings["p-minute"]
    assert {r.permission_id for r in readings} == {"p-minute"}
    assert {(r.data_tag, r.unit) for r in readings} == {("1-0:1.8.0", "kWh"), ("1-0:1.7.0", "W")}
    minutes = [start + minute * 60 * S for minute in range(1, 31)]
    register_times = sorted(t for tag, t in sink.service.unique("p-minute") if tag == "1-0:1.8.0")
    power_times = sorted(t for tag, t in sink.service.unique("p-minute") if tag == "1-0:1.7.0")
    assert register_times == [start, *minutes]
    assert power_times == minutes

    source = load_profile(shipped_profiles_dir() / "vienna-p1.toml").sources[0]
    meter = Meter(7)
    for (tag, end_us), value in sink.service.unique("p-minute").items():
        expected = (
            meter.register(source, tag, end_us)
            if end_us == start
            else meter.value(source, tag, end_us - 60 * S, end_us)
        )
        assert value == expected


async def test_first_reading_is_the_register_at_start_time_sent_at_once(
    tmp_path: Path, marketplace: FakeMarketplace, sink: RunningSink
) -> None:
    running = await start_stub(stub_config(tmp_path, marketplace, time_scale=1.0), marketplace)
    try:
        sink.service.tokens["p-now"] = "sink-token"
        start = time.time_ns() // 1000
        request = data_access("p-now", sink.uri, start_us=start, window_s=86400)
        await running.aiida.ConfigureDataAccess(configure(request), metadata=running.metadata())
        await asyncio.wait_for(sink.service.arrived.wait(), 5)  # at time scale 1, the first minute is far off
        (first,) = sink.service.readings["p-now"]
        assert (first.data_tag, first.time.ToMicroseconds()) == ("1-0:1.8.0", start)
    finally:
        await running.close()


async def test_access_is_fulfilled_when_the_window_ends(stub: RunningStub, sink: RunningSink) -> None:
    sink.service.tokens["p-short"] = "sink-token"
    connect = stub.aiida.Connect(metadata=stub.metadata())
    request = data_access("p-short", sink.uri, window_s=1800)  # half a second at 3600x
    await stub.aiida.ConfigureDataAccess(configure(request), metadata=stub.metadata())
    seen = await read_until(connect, status_of("p-short", State.STATE_FULFILLED))
    states = [m.data_access_status.state for m in seen if m.data_access_status.permission_id == "p-short"]
    assert states[0] == State.STATE_ACTIVE
    assert len(sink.service.unique("p-short")) == 1 + 30 * 2  # every reading arrived before FULFILLED
    fulfilled = await get(stub, "p-short")
    assert fulfilled.state == State.STATE_FULFILLED
    assert fulfilled.state_reason
    connect.cancel()


async def test_configure_is_idempotent_by_permission_id(stub: RunningStub, sink: RunningSink) -> None:
    sink.service.tokens["p-idem"] = "sink-token"
    first = await stub.aiida.ConfigureDataAccess(
        configure(data_access("p-idem", sink.uri)), metadata=stub.metadata()
    )
    other = data_access("p-idem", "grpc://127.0.0.1:1", need=data_need(tags=("1-0:2.8.0",)))
    second = await stub.aiida.ConfigureDataAccess(configure(other), metadata=stub.metadata())
    assert second == first


async def test_revoke_stops_the_data_within_a_second(stub: RunningStub, sink: RunningSink) -> None:
    sink.service.tokens["p-rev"] = "sink-token"
    request = data_access("p-rev", sink.uri, need=data_need(min_s=1), window_s=86400)
    await stub.aiida.ConfigureDataAccess(configure(request), metadata=stub.metadata())
    await wait_for(lambda: len(sink.service.readings["p-rev"]) > 50)

    revoked = await revoke(stub, "p-rev", "revoked by the customer")
    returned_at = time.monotonic()
    assert (revoked.state, revoked.state_reason) == (State.STATE_REVOKED, "revoked by the customer")
    count = len(sink.service.readings["p-rev"])
    while time.monotonic() - returned_at < 1.5:
        await asyncio.sleep(0.1)
    assert len(sink.service.readings["p-rev"]) == count


async def test_revoke_is_idempotent_and_a_revoked_id_stays_revoked(
    stub: RunningStub, sink: RunningSink
) -> None:
    first = await revoke(stub, "p-unknown", "terminated by the eligible party")
    assert (first.state, first.state_reason) == (State.STATE_REVOKED, "terminated by the eligible party")
    again = await revoke(stub, "p-unknown", "another reason")
    assert again == first
    late = await stub.aiida.ConfigureDataAccess(
        configure(data_access("p-unknown", sink.uri)), metadata=stub.metadata()
    )
    assert late.state == State.STATE_REVOKED
    assert sink.service.streams == 0


async def test_unfulfillable_need_is_recorded_and_reported(stub: RunningStub, sink: RunningSink) -> None:
    connect = stub.aiida.Connect(metadata=stub.metadata())
    need = data_need(tags=("1-0:1.8.0",), history_s=100 * 365 * 86400)  # a century of history
    access = await stub.aiida.ConfigureDataAccess(
        configure(data_access("p-old", sink.uri, need=need)), metadata=stub.metadata()
    )
    assert access.state == State.STATE_UNFULFILLABLE
    assert access.state_reason
    await read_until(connect, status_of("p-old", State.STATE_UNFULFILLABLE))
    assert sink.service.streams == 0
    connect.cancel()


async def test_get_unknown_access_is_not_found(stub: RunningStub) -> None:
    await expect_error(get(stub, "nope"), grpc.StatusCode.NOT_FOUND, "DATA_ACCESS_NOT_FOUND")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"permission_id": ""}, "data_access.permission_id"),
        ({"permission_id": "has/slash"}, "data_access.permission_id"),
        ({"permission_id": "x" * 129}, "data_access.permission_id"),
        ({"sink_uri": "http://127.0.0.1:1"}, "data_access.sink_uri"),
        ({"sink_uri": "grpc://nohostport"}, "data_access.sink_uri"),
        ({"sink_token": ""}, "data_access.sink_token"),
        ({"end_time": "start"}, "data_access.end_time"),
        ({"data_need": None}, "data_access.data_need"),
    ],
)
async def test_invalid_access_is_rejected_naming_the_field(
    stub: RunningStub, change: dict[str, object], field: str
) -> None:
    access = data_access("p-bad", "grpc://127.0.0.1:1")
    for key, value in change.items():
        if value is None:
            access.ClearField(key)  # type: ignore[arg-type]
        elif value == "start":
            access.end_time.CopyFrom(access.start_time)
        else:
            setattr(access, key, value)
    call = stub.aiida.ConfigureDataAccess(configure(access), metadata=stub.metadata())
    await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", field)
    listed = await stub.aiida.ListDataAccesses(aiida_pb2.ListDataAccessesRequest(), metadata=stub.metadata())
    assert list(listed.data_accesses) == []  # nothing half-written


async def test_missing_data_access_is_invalid(stub: RunningStub) -> None:
    call = stub.aiida.ConfigureDataAccess(aiida_pb2.ConfigureDataAccessRequest(), metadata=stub.metadata())
    await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, field="data_access")


async def test_revoke_without_a_permission_id_is_invalid(stub: RunningStub) -> None:
    call = stub.aiida.RevokeDataAccess(aiida_pb2.RevokeDataAccessRequest(), metadata=stub.metadata())
    await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, field="permission_id")


async def test_sink_refusing_the_token_fails_the_access(stub: RunningStub, sink: RunningSink) -> None:
    sink.service.reject_with = grpc.StatusCode.UNAUTHENTICATED
    connect = stub.aiida.Connect(metadata=stub.metadata())
    await stub.aiida.ConfigureDataAccess(
        configure(data_access("p-refused", sink.uri)), metadata=stub.metadata()
    )
    await read_until(connect, status_of("p-refused", State.STATE_FAILED))
    failed = await get(stub, "p-refused")
    assert failed.state == State.STATE_FAILED
    assert "UNAUTHENTICATED" in failed.state_reason
    connect.cancel()


async def test_streamer_reconnects_to_a_sink_that_comes_back(stub: RunningStub) -> None:
    gone = await start_sink()
    port = gone.port
    await gone.server.stop(0)  # nothing listens there now
    request = data_access("p-later", f"grpc://127.0.0.1:{port}", window_s=86400)
    await stub.aiida.ConfigureDataAccess(configure(request), metadata=stub.metadata())
    await asyncio.sleep(0.5)  # a few failed attempts
    back = await start_sink(port)
    back.service.tokens["p-later"] = "sink-token"
    try:
        await asyncio.wait_for(back.service.arrived.wait(), 10)
        assert (await get(stub, "p-later")).state == State.STATE_ACTIVE
    finally:
        await back.server.stop(0)


async def test_accesses_survive_a_restart_and_streaming_resumes(
    tmp_path: Path, marketplace: FakeMarketplace, sink: RunningSink
) -> None:
    sink.service.tokens["p-keep"] = "sink-token"
    config = stub_config(tmp_path, marketplace, time_scale=600.0)
    first = await start_stub(config, marketplace)
    request = data_access("p-keep", sink.uri, window_s=86400)
    await first.aiida.ConfigureDataAccess(configure(request), metadata=first.metadata())
    await revoke(first, "p-revoked")
    await asyncio.wait_for(sink.service.arrived.wait(), 10)
    code = first.app.instances["aiida-test-1"].record.pairing_code
    await first.close()

    sink.service.arrived.clear()
    second = await start_stub(config, marketplace)  # same secret: the marketplace accepts it again
    try:
        assert second.app.instances["aiida-test-1"].record.pairing_code == code
        listed = await second.aiida.ListDataAccesses(
            aiida_pb2.ListDataAccessesRequest(), metadata=second.metadata()
        )
        states = {a.permission_id: a.state for a in listed.data_accesses}
        assert states == {"p-keep": State.STATE_ACTIVE, "p-revoked": State.STATE_REVOKED}
        await asyncio.wait_for(sink.service.arrived.wait(), 10)
    finally:
        await second.close()
    assert (tmp_path / "state" / "aiida-state.json").stat().st_mode & 0o777 == 0o600


async def test_readings_of_another_energy_type_come_from_its_source(
    tmp_path: Path, marketplace: FakeMarketplace, sink: RunningSink
) -> None:
    profile = shipped_profiles_dir() / "graz-gas.toml"
    running = await start_stub(
        stub_config(tmp_path, marketplace, profiles=(profile,), time_scale=36000.0), marketplace
    )
    try:
        sink.service.tokens["p-gas"] = "sink-token"
        need = data_need(
            tags=("7-0:3.0.0",), energy_type=energy_pb2.ENERGY_TYPE_NATURAL_GAS, min_s=60, max_s=3600
        )
        request = data_access("p-gas", sink.uri, need=need, window_s=18000)  # 5 h at 36000x: 0.5 s
        access = await running.aiida.ConfigureDataAccess(configure(request), metadata=running.metadata())
        assert access.state == State.STATE_ACTIVE
        await wait_for(lambda: len(sink.service.unique("p-gas")) == 1 + 20)  # opening + 20 quarter hours
        assert {(r.data_tag, r.unit) for r in sink.service.readings["p-gas"]} == {("7-0:3.0.0", "m3")}
    finally:
        await running.close()
