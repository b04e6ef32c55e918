"""The fleet simulator: many instances behind one port, routed by the aiida-instance-id header."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

from aiida_stub.profile import shipped_profiles_dir
from eddie.aiida.v1 import aiida_pb2
from tests.support.stub import FakeMarketplace, start_stub, stub_config
from tests.support.stub_messages import data_need

FLEET = 50


async def test_fifty_instances_register_and_answer_on_one_port(
    tmp_path: Path, marketplace: FakeMarketplace
) -> None:
    profiles = (shipped_profiles_dir() / "vienna-p1.toml", shipped_profiles_dir() / "berlin-flat.toml")
    config = stub_config(
        tmp_path, marketplace, instance_id=None, fleet=FLEET, id_prefix="fleet", profiles=profiles
    )
    running = await start_stub(config, marketplace)
    try:
        ids = [f"fleet-{i}" for i in range(FLEET)]
        assert sorted(marketplace.service.secrets) == sorted(ids)
        assert set(marketplace.service.addresses.values()) == {f"127.0.0.1:{running.port}"}
        assert len(set(marketplace.service.secrets.values())) == FLEET  # a secret of its own each

        # Round-robin profiles: even instances are in Vienna (AT-9), odd ones in Berlin (DE-BE).
        need = data_need(tags=("1-0:1.8.0",), regions=("AT",))
        calls = {i: running.aiida.Connect(metadata=running.metadata(i)) for i in ids}
        for i, call in calls.items():
            query = aiida_pb2.SearchQuery(query_id=i, data_need=need)
            await call.write(aiida_pb2.ConnectRequest(search_query=query))
        replies = {}
        for i, call in calls.items():
            reply = await asyncio.wait_for(call.read(), 10)
            replies[reply.match_reply.query_id] = reply.match_reply.matched
            call.cancel()
        assert replies == {f"fleet-{n}": n % 2 == 0 for n in range(FLEET)}

        with (tmp_path / "state" / "fleet.csv").open() as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["instance_id", "pairing_code"]
        assert {r[0]: r[1] for r in rows[1:]} == marketplace.service.pairing_codes
        assert len(running.app.store.instances) == FLEET
        assert [p.name for p in (tmp_path / "state").iterdir() if p.suffix == ".json"] == ["aiida-state.json"]
    finally:
        await running.close()


async def test_a_fleet_keeps_its_secrets_across_restarts(
    tmp_path: Path, marketplace: FakeMarketplace
) -> None:
    config = stub_config(tmp_path, marketplace, instance_id=None, fleet=5, id_prefix="keep")
    first = await start_stub(config, marketplace)
    codes = {i: inst.record.pairing_code for i, inst in first.app.instances.items()}
    await first.close()
    second = await start_stub(config, marketplace)  # the marketplace would refuse other secrets
    try:
        assert {i: inst.record.pairing_code for i, inst in second.app.instances.items()} == codes
    finally:
        await second.close()
