"""The fleet simulator at scale: 1,000 instances behind one port, registered, claimed and searched."""

from __future__ import annotations

import asyncio
import csv
import time
from pathlib import Path

import pytest

from aiida_stub.config import Config as AiidaConfig
from aiida_stub.server import create_server
from eddie.marketplace.v1 import instance_pb2
from tests.support.fleet import create_data_request, search
from tests.support.marketplace import start_marketplace, test_config

PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"
N = 1000


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_fleet_of_a_thousand_registers_connects_and_answers(tmp_path: Path) -> None:
    marketplace = await start_marketplace(
        test_config(tmp_path, claim_attempts_per_minute=100_000, search_rate_per_minute=1000)
    )
    config = AiidaConfig(
        marketplace=marketplace.address,
        state_dir=tmp_path / "fleet",
        profiles=(PROFILES,),
        fleet=N,
        id_prefix="f",
        log_level="warning",
    )
    fleet, _ = await create_server(config)
    await fleet.start()
    try:
        started = time.monotonic()
        await fleet.wait_registered()
        rows = list(csv.DictReader((tmp_path / "fleet" / "fleet.csv").open()))
        assert [r["instance_id"] for r in rows] == [f"f-{i}" for i in range(N)]
        owner = await marketplace.customer()
        slots = asyncio.Semaphore(32)

        async def claim(row: dict[str, str]) -> None:
            async with slots:
                await owner.instances.ClaimInstance(
                    instance_pb2.ClaimInstanceRequest(
                        instance_id=row["instance_id"], pairing_code=row["pairing_code"]
                    ),
                    metadata=owner.metadata,
                )

        await asyncio.gather(*(claim(r) for r in rows))
        ep = await marketplace.eligible_party()
        request = await create_data_request(ep, max_granularity=3600 * 24, tags=["1-0:1.8.0"])
        while True:
            _, summary = await search(ep, request.name, timeout=10)
            if summary.matched + summary.not_matched == N:
                break
            assert time.monotonic() - started < 240, summary
            await asyncio.sleep(0.5)
        assert summary.queried == N
        assert summary.unreachable == 0 and summary.timed_out == 0
        print(f"\n{N} instances registered, claimed and answering after {time.monotonic() - started:.1f}s")
    finally:
        await fleet.stop(0)
        await marketplace.channel.close()
        await marketplace.app.stop(0)
