"""A search's match set is stored in chunks of 1,000 sorted ids (search_match_chunks), not a row per match.

Through a real marketplace on port 0: GetSearch lists exactly the stored ids in order, RequestAccess
accepts what some search of the data request matched (an older one too) and refuses the rest, ids on
chunk boundaries included, and the activity feed says which searches matched. The fan-out itself is
scripted (the ClusterSearch hook the cluster uses): thousands of real AIIDA streams would make the
test slow without testing the storage any better; the searches' own tests cover the fan-out.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import select

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, instance_pb2
from eddie_common.interceptors import error_info
from marketplace_server.aiida.fanout import SearchUpdate
from marketplace_server.db.models import MATCH_CHUNK, SearchMatchChunkRow
from marketplace_server.resources import parse_search_name
from tests.marketplace.test_activities import feed
from tests.support.access import SECRET, SINK_URI, Scene, aiida, market, new_scene
from tests.support.aiida_double import RunningAiida
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

__all__ = ["aiida", "market"]  # fixtures

Activity = consent_pb2.Activity

# 2,500 matches: chunks [m-0000 .. m-0999], [m-1000 .. m-1999], [m-2000 .. m-2499].
BROAD = [f"m-{n:04d}" for n in range(2500)]
# Claimed instances on the chunks' first and last ids.
ON_BOUNDARIES = ["m-0000", "m-0999", "m-1000", "m-1999", "m-2000", "m-2499"]
# Claimed, never matched: between two chunks, inside one's range, after the last, before the first.
NEVER = ["m-0999a", "m-1500a", "m-2499a", "l-0000"]


class ScriptedFanOut:
    """Answers the next search with the given matched ids, in shuffled batches of 300."""

    def __init__(self) -> None:
        self.next: list[str] = []

    async def search(
        self, data_need: energy_pb2.DataNeed, timeout: float
    ) -> AsyncGenerator[SearchUpdate | dict[str, int], None]:
        ids = list(self.next)
        random.Random(7).shuffle(ids)
        queried = len(ids) * 2
        for start in range(0, len(ids), 300):
            yield SearchUpdate(ids=ids[start : start + 300], answered=start + 300, queried=queried)
        yield {
            "queried": queried,
            "matched": len(ids),
            "not_matched": queried - len(ids),
            "unreachable": 0,
            "timed_out": 0,
        }


def _scripted(market: RunningMarketplace) -> ScriptedFanOut:
    fan_out = ScriptedFanOut()
    market.app.search.cluster = fan_out
    return fan_out


async def _search(
    scene: Scene, data_request: data_request_pb2.DataRequest | None = None
) -> tuple[list[str], str]:
    """(the streamed ids, the stored search's name)."""
    streamed: list[str] = []
    async for response in scene.ep.data_requests.SearchInstances(
        data_request_pb2.SearchInstancesRequest(
            data_request=(data_request or scene.data_request).name, timeout=Duration(seconds=5)
        ),
        metadata=scene.ep.metadata,
    ):
        if response.HasField("matches"):
            streamed.extend(response.matches.instance_ids)
        else:
            return streamed, response.summary.search
    raise AssertionError("no summary")


async def _chunks(market: RunningMarketplace, search: str) -> list[tuple[int, str, str, list[str]]]:
    _, search_id = parse_search_name(search)
    async with market.app.sessions() as session:
        rows = await session.scalars(
            select(SearchMatchChunkRow)
            .where(SearchMatchChunkRow.search_id == search_id)
            .order_by(SearchMatchChunkRow.seq)
        )
        return [(r.seq, r.first_id, r.last_id, r.instance_ids.split("\n")) for r in rows]


async def test_2500_matches_are_three_chunk_rows_and_get_search_lists_exactly_them_in_order(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    fan_out = _scripted(market)
    fan_out.next = BROAD
    streamed, search = await _search(scene)
    assert sorted(streamed) == BROAD
    chunks = await _chunks(market, search)
    assert [(seq, first, last, len(ids)) for seq, first, last, ids in chunks] == [
        (0, "m-0000", "m-0999", MATCH_CHUNK),
        (1, "m-1000", "m-1999", MATCH_CHUNK),
        (2, "m-2000", "m-2499", 500),
    ]
    assert [i for *_, ids in chunks for i in ids] == BROAD
    stored = await scene.ep.data_requests.GetSearch(
        data_request_pb2.GetSearchRequest(name=search), metadata=scene.ep.metadata
    )
    assert list(stored.matched_instance_ids) == BROAD
    assert (stored.summary.matched, stored.summary.queried) == (2500, 5000)

    # Bytewise order, exactly one chunk at 1,000 and none for a search that matched nothing.
    fan_out.next = [f"Z.{n:03d}" for n in range(997)] + ["a-1", "a_1", "A-1"]
    _, search = await _search(scene)
    chunks = await _chunks(market, search)
    assert [(seq, first, last, len(ids)) for seq, first, last, ids in chunks] == [(0, "A-1", "a_1", 1000)]
    stored = await scene.ep.data_requests.GetSearch(
        data_request_pb2.GetSearchRequest(name=search), metadata=scene.ep.metadata
    )
    assert list(stored.matched_instance_ids) == sorted(fan_out.next)
    fan_out.next = []
    _, search = await _search(scene)
    assert await _chunks(market, search) == []
    stored = await scene.ep.data_requests.GetSearch(
        data_request_pb2.GetSearchRequest(name=search), metadata=scene.ep.metadata
    )
    assert list(stored.matched_instance_ids) == []


async def _claimed(scene: Scene, instance_id: str) -> None:
    """A registered instance on the double with this id, claimed by a new customer."""
    code = f"CODE-{instance_id}"
    scene.double.matches[instance_id] = True
    await scene.market.client().instances.RegisterInstance(
        instance_pb2.RegisterInstanceRequest(
            instance_id=instance_id, address=scene.aiida.address, instance_secret=SECRET, pairing_code=code
        )
    )
    owner = await scene.market.customer()
    await owner.instances.ClaimInstance(
        instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code), metadata=owner.metadata
    )
    scene.customers[instance_id] = owner


async def _request(scene: Scene, *ids: str) -> access_pb2.RequestAccessResponse:
    return await scene.ep.access.RequestAccess(
        access_pb2.RequestAccessRequest(
            data_request=scene.data_request.name, instance_ids=ids, sink_uri=SINK_URI
        ),
        metadata=scene.ep.metadata,
    )


async def _refused(scene: Scene, *ids: str) -> str:
    err = await expect_error(
        _request(scene, *ids), grpc.StatusCode.FAILED_PRECONDITION, "INSTANCE_NOT_MATCHED"
    )
    info = error_info(err)
    assert info is not None
    return info.metadata["instance_id"]


async def test_request_access_takes_what_an_older_search_matched_and_refuses_the_never_matched(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    newer_only, elsewhere = "n-0001", "o-0001"
    for instance_id in [*ON_BOUNDARIES, *NEVER, newer_only, elsewhere]:
        await _claimed(scene, instance_id)
    fan_out = _scripted(market)
    fan_out.next = BROAD
    _, older = await _search(scene)
    fan_out.next = [newer_only, "m-2000", *(f"n-{n:04d}" for n in range(2, 12))]
    _, newer = await _search(scene)
    other = await scene.ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(
                title="Other", purpose="Another study", data_need=scene.data_request.data_need
            )
        ),
        metadata=scene.ep.metadata,
    )
    fan_out.next = [elsewhere, *NEVER]  # matched, but for another data request
    await _search(scene, other)

    for never in [*NEVER, elsewhere]:
        assert await _refused(scene, never) == never
    assert await _refused(scene, "m-0000", "m-0999a", "m-2499") == "m-0999a"
    assert await _refused(scene, newer_only, "m-1500a") == "m-1500a"
    listed = await scene.ep.access.ListPermissions(
        access_pb2.ListPermissionsRequest(data_request=scene.data_request.name), metadata=scene.ep.metadata
    )
    assert list(listed.permissions) == []

    # The boundary ids only the older search matched, with one the newer matched too and one only it did.
    asked = [*ON_BOUNDARIES, newer_only]
    response = await _request(scene, *asked)
    assert [p.instance_id for p in response.permissions] == asked
    assert {p.state for p in response.permissions} == {access_pb2.Permission.STATE_PENDING}

    # The customers' feeds: which of the two searches matched their instance.
    for instance_id, matched in [
        ("m-0999", {older}),
        ("m-2000", {older, newer}),
        (newer_only, {newer}),
        ("m-0999a", set()),
        ("m-1500a", set()),
    ]:
        activities = await feed(scene.customers[instance_id], instance_id)
        searches = {a.search: a.matched for a in activities if a.kind == Activity.KIND_SEARCH}
        assert {older, newer} <= set(searches), (instance_id, searches)
        assert {s for s in (older, newer) if searches[s]} == matched, instance_id


@pytest.mark.postgres
async def test_on_postgres(pg_marketplace: RunningMarketplace, aiida: RunningAiida) -> None:
    await test_request_access_takes_what_an_older_search_matched_and_refuses_the_never_matched(
        pg_marketplace, aiida
    )
    await test_2500_matches_are_three_chunk_rows_and_get_search_lists_exactly_them_in_order(
        pg_marketplace, aiida
    )
