"""Workflow 6 over MQTT with real processes: marketplace, an AIIDA, and a sink subscribed to Mosquitto.

The EP asks for `mqtt://127.0.0.1:1883`; after the customer's approval the
AIIDA publishes on EDDIE's topics, the sink stores what it receives, and the
EP lists the readings. An EDDIE `TERMINATE` command on the command topic ends
the access at the AIIDA and the permission at the marketplace (TERMINATED).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from eddie.marketplace.v1 import access_pb2
from eddie_client import procs
from eddie_client.client import (
    ROLE_CUSTOMER,
    ROLE_ELIGIBLE_PARTY,
    MarketplaceClient,
    Session,
    data_need,
    list_readings,
)
from tests.support.cast import PROFILES
from tests.support.expect import eventually
from tests.support.mqtt import clear_retained

pytestmark = pytest.mark.e2e
PASSWORD = "end to end passphrase"
S = access_pb2.Permission.State


@pytest.fixture
def programs(tmp_path: Path, broker: str) -> Iterator[tuple[procs.Proc, procs.Proc]]:
    started: list[procs.Proc] = []
    try:
        mp = procs.start_marketplace(tmp_path / "mp", tmp_path)
        started.append(mp)
        sink, aiida = procs.start_all(  # both need only the marketplace: they start together
            [
                lambda: procs.start_sink(
                    mp.address, tmp_path / "sink", tmp_path, "--mqtt-url", broker, name="sink"
                ),
                lambda: procs.start_aiida(
                    mp.address,
                    tmp_path / "alice",
                    PROFILES / "vienna-p1.toml",
                    tmp_path,
                    *("--instance-id", "aiida-alice", "--pairing-code", "ALICE-MQTT", "--time-scale", "60"),
                    name="aiida-alice",
                ),
            ]
        )
        started += [sink, aiida]
        yield mp, sink
    finally:
        procs.stop_all(started)


async def test_an_approved_mqtt_permission_delivers_and_terminate_ends_it(
    programs: tuple[procs.Proc, procs.Proc], broker: str
) -> None:
    mp_proc, sink_proc = programs
    async with MarketplaceClient(mp_proc.address) as mp:
        ep = await mp.sign_up(ROLE_ELIGIBLE_PARTY, "ep@mqtt.example", PASSWORD, "MQTT Research")
        alice = await mp.sign_up(ROLE_CUSTOMER, "alice@mqtt.example", PASSWORD, "Alice")
        await alice.claim("aiida-alice", "ALICE-MQTT", wait=10)
        await eventually(lambda: _connected(alice), 10, "the AIIDA is connected")
        need = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400, ["AT"])
        request = await ep.create_data_request("MQTT study", "Grid planning", need)
        matches, _ = await ep.search(request.name, timeout=3)
        assert matches == ["aiida-alice"]
        (permission,) = await ep.request_access(request.name, matches, broker)
        assert permission.sink_uri == broker
        await alice.decide(permission.name, True)
        await eventually(lambda: _state_is(ep, permission.name, S.STATE_ACTIVE), 10, "ACTIVE")
        permission_id = permission.name.removeprefix("permissions/")

        async def readings() -> list[Any]:
            return await list_readings(sink_proc.address, permission_id, ep.token)

        listed = await eventually(readings, 15, "readings listed by the EP")
        assert {r.data_tag for r in listed} == {"1-0:1.8.0"}

        port = int(broker.rsplit(":", 1)[1])
        async with aiomqtt.Client("127.0.0.1", port) as eddie:
            command = {"action": "TERMINATE", "permissionId": permission_id}
            await eddie.publish(f"aiida/v1/{permission_id}/command/terminate", json.dumps(command), qos=1)
        ended = await eventually(lambda: _state_is(ep, permission.name, S.STATE_TERMINATED), 10, "TERMINATED")
        assert ended
        await clear_retained("127.0.0.1", port, [permission_id])


async def _connected(session: Session) -> bool:
    return all(i.connected for i in await session.list_instances())


async def _state_is(ep: Session, name: str, state: int) -> bool:
    return (await ep.get_permission(name)).state == state
