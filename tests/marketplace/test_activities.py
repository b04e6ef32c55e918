"""The household's audit feed: every search its AIIDA was asked, every step of every permission."""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration

from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import consent_pb2, data_request_pb2
from eddie_client.client import Session
from tests.support.access import Permission, Scene, aiida, data_need, market, new_scene
from tests.support.aiida_double import RunningAiida
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

__all__ = ["aiida", "market"]  # fixtures

Activity = consent_pb2.Activity
DataAccess = aiida_pb2.DataAccess


async def feed(customer: Session, instance_id: str, page_size: int = 0) -> list[Activity]:
    """The whole feed, page by page."""
    found: list[Activity] = []
    token = ""
    while True:
        page = await customer.consent.ListActivities(
            consent_pb2.ListActivitiesRequest(
                instance=f"instances/{instance_id}", page_size=page_size, page_token=token
            ),
            metadata=customer.metadata,
        )
        found.extend(page.activities)
        token = page.next_page_token
        if not token:
            return found


async def other_request(scene: Scene, ep: Session, purpose: str) -> data_request_pb2.DataRequest:
    return await ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(title="Survey", purpose=purpose, data_need=data_need())
        ),
        metadata=ep.metadata,
    )


async def search(ep: Session, request: data_request_pb2.DataRequest) -> str:
    async for response in ep.data_requests.SearchInstances(
        data_request_pb2.SearchInstancesRequest(data_request=request.name, timeout=Duration(seconds=5)),
        metadata=ep.metadata,
    ):
        if response.HasField("summary"):
            return str(response.summary.search)
    raise AssertionError("no summary")


async def test_the_feed_lists_searches_and_permission_steps_newest_first_with_matched_flags(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    scene.double.configure_state = DataAccess.STATE_ACTIVE  # as the reference AIIDA answers
    before_claim = await search(scene.ep, scene.data_request)  # asked nobody of ours: not listed
    customer = await market.customer()
    instance = await scene.add_instance(customer)
    matched = await search(scene.ep, scene.data_request)
    other_ep = await market.eligible_party("Stadtwerk Graz")
    survey = await other_request(scene, other_ep, "Tariff survey")
    scene.double.matches[instance] = False
    not_matched = await search(other_ep, survey)
    [permission] = await scene.request_access(instance)
    await scene.decide(permission, True, "ok")
    await scene.until_state(permission, Permission.STATE_ACTIVE)
    await customer.consent.RevokePermission(
        consent_pb2.RevokePermissionRequest(name=permission.name, reason="moving out"),
        metadata=customer.metadata,
    )

    activities = await feed(customer, instance)
    assert [(a.kind, a.matched, a.search, a.permission) for a in activities] == [
        (Activity.KIND_ACCESS_ENDED, False, "", permission.name),
        (Activity.KIND_ACCESS_STARTED, False, "", permission.name),
        (Activity.KIND_ACCESS_APPROVED, False, "", permission.name),
        (Activity.KIND_ACCESS_REQUESTED, False, "", permission.name),
        (Activity.KIND_SEARCH, False, not_matched, ""),
        (Activity.KIND_SEARCH, True, matched, ""),
    ]
    assert before_claim not in {a.search for a in activities}
    times = [a.time.ToNanoseconds() for a in activities]
    assert times == sorted(times, reverse=True)
    assert {a.instance_id for a in activities} == {instance}
    ended, *_, survey_search, first_search = activities
    assert (ended.state, ended.reason) == (Permission.STATE_REVOKED, "moving out")
    assert (survey_search.data_request, survey_search.purpose) == (survey.name, "Tariff survey")
    assert survey_search.eligible_party_display_name == "Stadtwerk Graz"
    assert first_search.eligible_party_display_name == "Wien Energie"
    assert first_search.purpose == "Grid planning research"


async def test_paging_one_at_a_time_walks_the_same_feed(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    customer = await market.customer()
    instance = await scene.add_instance(customer)
    for _ in range(3):
        await search(scene.ep, scene.data_request)
    [permission] = await scene.request_access(instance)
    await scene.decide(permission, False)
    everything = await feed(customer, instance)
    assert len(everything) == 5
    assert await feed(customer, instance, page_size=1) == everything
    assert await feed(customer, instance, page_size=2) == everything


async def test_someone_elses_or_an_unknown_instance_is_not_found_and_eligible_parties_are_refused(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    owner = await market.customer()
    instance = await scene.add_instance(owner)
    stranger = await market.customer()
    for name in (f"instances/{instance}", "instances/no-such-instance"):
        await expect_error(
            stranger.consent.ListActivities(
                consent_pb2.ListActivitiesRequest(instance=name), metadata=stranger.metadata
            ),
            grpc.StatusCode.NOT_FOUND,
            "INSTANCE_NOT_FOUND",
        )
    await expect_error(
        scene.ep.consent.ListActivities(
            consent_pb2.ListActivitiesRequest(instance=f"instances/{instance}"), metadata=scene.ep.metadata
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    for bad in ("", instance, f"instances/{instance}\n", "instances/a/b"):
        await expect_error(
            owner.consent.ListActivities(
                consent_pb2.ListActivitiesRequest(instance=bad), metadata=owner.metadata
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            field="instance",
        )


async def test_a_page_token_works_only_for_its_instance_and_caller(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    owner = await market.customer()
    first = await scene.add_instance(owner)
    second = await scene.add_instance(owner)
    await search(scene.ep, scene.data_request)
    await search(scene.ep, scene.data_request)
    page = await owner.consent.ListActivities(
        consent_pb2.ListActivitiesRequest(instance=f"instances/{first}", page_size=1), metadata=owner.metadata
    )
    assert page.next_page_token
    await expect_error(
        owner.consent.ListActivities(
            consent_pb2.ListActivitiesRequest(
                instance=f"instances/{second}", page_token=page.next_page_token
            ),
            metadata=owner.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
