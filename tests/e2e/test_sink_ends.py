"""The sink honours every end, with real processes (issue 15, points 4 and 5).

A hostile publisher, a raw `Publish` stream holding the permission's valid sink
token (taken from the AIIDA's own state), keeps sending after the customer
revokes: one second later the sink refuses it (PERMISSION_DENIED,
PERMISSION_ENDED) and stores nothing more, on the open stream and on new ones,
and still after the sink restarts. Deleting an account ends its permissions the
same way, seen from the EP's side and the sink's.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import access_pb2, consent_pb2, identity_pb2
from eddie_client import procs
from eddie_client.client import MarketplaceClient, Session, data_need
from eddie_common.interceptors import error_info
from tests.e2e.test_access_processes import _readings, _setup, _state_is
from tests.support.cast import Cast
from tests.support.expect import eventually

pytestmark = pytest.mark.e2e
S = access_pb2.Permission.State


def _sink_token(state_dir: Path, permission_id: str) -> str:
    """The sink token the AIIDA was configured with, from its own state file."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("permission_id") == permission_id and node.get("sink_token"):
                found.append(node["sink_token"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads((state_dir / "aiida-state.json").read_text()))
    assert found, "the AIIDA holds no sink token for the permission"
    return found[0]


class HostilePublisher:
    """A raw Publish stream with a valid sink token that ignores every "no"."""

    def __init__(self, sink_address: str, token: str, permission_id: str) -> None:
        self.channel = grpc.aio.insecure_channel(sink_address)
        self.stub = data_sink_pb2_grpc.DataSinkServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.permission_id = permission_id
        self.sent: list[int] = []  # reading times (s)
        self._seconds = int(time.time()) + 10**8  # years away from the AIIDA's own reading times

    def reading(self) -> data_sink_pb2.PublishRequest:
        self._seconds += 1
        self.sent.append(self._seconds)
        return data_sink_pb2.PublishRequest(
            reading=energy_pb2.Reading(
                permission_id=self.permission_id,
                data_tag="1-0:1.8.0",
                value=9.99,
                unit="kWh",
                time=timestamp_pb2.Timestamp(seconds=self._seconds),
            )
        )

    def open(self) -> Any:
        return self.stub.Publish(metadata=self.metadata, timeout=30)

    async def send_until_refused(self, call: Any, count: int = 3) -> grpc.aio.AioRpcError:
        """Writes readings on `call` and ends it; returns the error the sink ended it with."""
        try:
            for _ in range(count):
                await call.write(self.reading())
                await asyncio.sleep(0.05)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the sink already ended the stream: its status says why
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            return exc
        raise AssertionError(f"the sink accepted {response.accepted} readings after the end")

    async def close(self) -> None:
        await self.channel.close()


def _assert_ended(error: grpc.aio.AioRpcError) -> None:
    info = error_info(error)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
    assert info is not None and info.reason == "PERMISSION_ENDED", error.details()


async def _active_permission(cast: Cast) -> tuple[MarketplaceClient, Session, dict[str, Session], Any]:
    mp, ep, customers = await _setup(cast)
    need = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400, ["AT-9"])
    request = await ep.create_data_request("Long study", "Research", need)
    matches, _ = await ep.search(request.name, timeout=3)
    assert matches == ["aiida-alice"]
    (permission,) = await ep.request_access(request.name, matches, f"grpc://{cast.sink.address}")
    await customers["alice"].decide(permission.name, True)
    await eventually(lambda: _state_is(ep, permission.name, S.STATE_ACTIVE), 10)
    await eventually(lambda: _readings(cast, ep, permission), 10)
    return mp, ep, customers, permission


async def _stored_times(cast: Cast, ep: Session, permission: Any) -> set[int]:
    return {r.time.seconds for r in await _readings(cast, ep, permission)}


async def test_a_hostile_publisher_is_refused_a_second_after_revocation_and_after_a_sink_restart(
    cast: Cast, tmp_path: Path
) -> None:
    mp, ep, customers, permission = await _active_permission(cast)
    permission_id = permission.name.removeprefix("permissions/")
    hostile = HostilePublisher(
        cast.sink.address, _sink_token(tmp_path / "alice", permission_id), permission_id
    )
    try:
        call = hostile.open()
        await call.write(hostile.reading())  # accepted while the permission is active
        await eventually(lambda: _has(cast, ep, permission, hostile.sent[0]), 10)

        await customers["alice"].consent.RevokePermission(
            consent_pb2.RevokePermissionRequest(name=permission.name, reason="enough"),
            metadata=customers["alice"].metadata,
        )
        await asyncio.sleep(1.0)
        after = len(hostile.sent)
        _assert_ended(await hostile.send_until_refused(call))  # the open stream
        _assert_ended(await hostile.send_until_refused(hostile.open()))  # a new one
        stored = await _stored_times(cast, ep, permission)
        assert not stored & set(hostile.sent[after:]), "a reading sent after the end was stored"
    finally:
        await hostile.close()

    # The sink restarts (same database, new port): it still refuses.
    cast.sink.stop()
    cast.sink = procs.start_sink(cast.marketplace.address, tmp_path / "sink", tmp_path, name="sink-2")
    hostile = HostilePublisher(
        cast.sink.address, hostile.metadata[0][1].removeprefix("Bearer "), permission_id
    )
    try:
        _assert_ended(await hostile.send_until_refused(hostile.open()))
        assert not (await _stored_times(cast, ep, permission)) & set(hostile.sent)
    finally:
        await hostile.close()
    await mp.channel.close()


async def _has(cast: Cast, ep: Session, permission: Any, seconds: int) -> bool:
    return seconds in await _stored_times(cast, ep, permission)


async def test_deleting_the_customer_ends_the_data_seen_by_the_ep_and_the_sink(
    cast: Cast, tmp_path: Path
) -> None:
    mp, ep, customers, permission = await _active_permission(cast)
    permission_id = permission.name.removeprefix("permissions/")
    hostile = HostilePublisher(
        cast.sink.address, _sink_token(tmp_path / "alice", permission_id), permission_id
    )
    alice = customers["alice"]
    try:
        call = hostile.open()
        await call.write(hostile.reading())
        await alice.identity.DeleteAccount(
            identity_pb2.DeleteAccountRequest(name=alice.account.name), metadata=alice.metadata
        )
        # The EP sees the permission revoked at once; the instance is unclaimed.
        ended = await ep.get_permission(permission.name)
        assert ended.state == S.STATE_REVOKED and "deleted" in ended.state_reason
        await asyncio.sleep(1.0)
        after = len(hostile.sent)
        _assert_ended(await hostile.send_until_refused(call))
        stored = await _stored_times(cast, ep, permission)
        assert not stored & set(hostile.sent[after:])
        # The AIIDA was told too: its own readings stop.
        await asyncio.sleep(1.0)
        settled = len(await _readings(cast, ep, permission))
        await asyncio.sleep(1.5)
        assert len(await _readings(cast, ep, permission)) == settled
    finally:
        await hostile.close()
    # The deleted customer's token is refused; the e-mail is free again.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await alice.identity.GetCurrentAccount(
            identity_pb2.GetCurrentAccountRequest(), metadata=alice.metadata
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await mp.sign_up(1, "alice@e2e.example", "end to end passphrase", "Alice Again")
    await mp.channel.close()
