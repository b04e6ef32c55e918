"""The singling-out floor on a fleet: with --min-match-set 3, a search matching 1 or 2 households
streams and stores no ids and says withheld; one matching 3 or more streams them as usual."""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from aiida_stub.config import Config as AiidaConfig
from aiida_stub.server import create_server
from eddie.marketplace.v1 import access_pb2, data_request_pb2, instance_pb2
from eddie_client.client import Session
from tests.support.expect import expect_error
from tests.support.fleet import create_data_request, search
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config

PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"
FLEET = 10  # five profiles round-robin: two households each
FLOOR = 3


@pytest.fixture
async def fleet_world(tmp_path: Path) -> AsyncIterator[tuple[RunningMarketplace, Session]]:
    marketplace = await start_marketplace(
        test_config(
            tmp_path, min_match_set=FLOOR, claim_attempts_per_minute=10_000, search_rate_per_minute=1000
        )
    )
    fleet, _ = await create_server(
        AiidaConfig(
            marketplace=marketplace.address,
            state_dir=tmp_path / "fleet",
            profiles=(PROFILES,),
            fleet=FLEET,
            id_prefix="w",
            log_level="warning",
        )
    )
    await fleet.start()
    try:
        await fleet.wait_registered()
        owner = await marketplace.customer()
        for row in csv.DictReader((tmp_path / "fleet" / "fleet.csv").open()):
            await owner.instances.ClaimInstance(
                instance_pb2.ClaimInstanceRequest(
                    instance_id=row["instance_id"], pairing_code=row["pairing_code"]
                ),
                metadata=owner.metadata,
            )
        ep = await marketplace.eligible_party()
        yield marketplace, ep
    finally:
        await fleet.stop(0)
        await marketplace.channel.close()
        await marketplace.app.stop(0)


async def _search_all_answering(
    ep: Session, request: data_request_pb2.DataRequest
) -> tuple[list[str], data_request_pb2.SearchSummary]:
    """Searches until every instance of the fleet is connected and answers."""
    started = time.monotonic()
    while True:
        matches, summary = await search(ep, request.name, timeout=5)
        if summary.matched + summary.not_matched == FLEET:
            return matches, summary
        assert time.monotonic() - started < 60, summary
        await asyncio.sleep(0.2)


async def _stored(ep: Session, search: str) -> data_request_pb2.Search:
    return await ep.data_requests.GetSearch(
        data_request_pb2.GetSearchRequest(name=search), metadata=ep.metadata
    )


async def test_a_search_matching_fewer_than_the_floor_is_withheld(
    fleet_world: tuple[RunningMarketplace, Session],
) -> None:
    _, ep = fleet_world
    vienna = await create_data_request(ep, regions=["AT-9"])  # two households of the fleet
    matches, summary = await _search_all_answering(ep, vienna)
    assert matches == []
    assert (summary.withheld, summary.matched, summary.queried) == (True, 2, FLEET)
    stored = await _stored(ep, summary.search)
    assert list(stored.matched_instance_ids) == [] and stored.summary.withheld
    assert stored.summary.matched == 2
    for instance_id in ("w-0", "w-1", "w-2", "w-3", "w-4"):
        await expect_error(
            ep.access.RequestAccess(
                access_pb2.RequestAccessRequest(
                    data_request=vienna.name, instance_ids=[instance_id], sink_uri="grpc://127.0.0.1:1"
                ),
                metadata=ep.metadata,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INSTANCE_NOT_MATCHED",
        )


async def test_a_search_matching_the_floor_or_more_streams_its_matches(
    fleet_world: tuple[RunningMarketplace, Session],
) -> None:
    _, ep = fleet_world
    electricity = await create_data_request(ep)  # every household with an electricity meter
    matches, summary = await _search_all_answering(ep, electricity)
    assert not summary.withheld and summary.matched >= FLOOR
    assert sorted(matches) == sorted((await _stored(ep, summary.search)).matched_instance_ids)
    assert len(set(matches)) == len(matches) == summary.matched
    granted = await ep.access.RequestAccess(
        access_pb2.RequestAccessRequest(
            data_request=electricity.name, instance_ids=matches[:1], sink_uri="grpc://127.0.0.1:1"
        ),
        metadata=ep.metadata,
    )
    assert len(granted.permissions) == 1


async def test_a_search_matching_nobody_is_not_withheld(
    fleet_world: tuple[RunningMarketplace, Session],
) -> None:
    _, ep = fleet_world
    nobody = await create_data_request(ep, energy_type="HYDROGEN", regions=["AT"])
    matches, summary = await _search_all_answering(ep, nobody)
    assert (matches, summary.matched, summary.withheld) == ([], 0, False)
