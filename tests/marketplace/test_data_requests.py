"""Workflow 4 through a real server: create (with request ids), get and close.

All tests share one server (module scope): each signs up its own accounts, so
they do not see each other's data requests. Browsing is in test_data_request_browsing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from eddie.marketplace.v1 import data_request_pb2
from eddie_client.client import Session
from tests.support.data_requests import (
    DAY,
    GAS,
    REQUEST,
    SERVICE,
    create_as,
    data_request,
    list_as,
    need,
    serving,
)
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

pytestmark = pytest.mark.asyncio(loop_scope="module")

DataRequest = data_request_pb2.DataRequest
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def marketplace(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningMarketplace]:
    async with serving(tmp_path_factory.mktemp("data-requests")) as running:
        yield running


async def get_as(client: Session, name: str) -> data_request_pb2.DataRequest:
    request = data_request_pb2.GetDataRequestRequest(name=name)
    return await client.data_requests.GetDataRequest(request, metadata=client.metadata)


async def close_as(client: Session, name: str) -> data_request_pb2.DataRequest:
    request = data_request_pb2.CloseDataRequestRequest(name=name)
    return await client.data_requests.CloseDataRequest(request, metadata=client.metadata)


# --- create ---


async def test_create_returns_every_field_and_get_reads_it_back(marketplace: RunningMarketplace) -> None:
    ep = await marketplace.eligible_party("Wien Energie")
    sent = data_request(
        kind=SERVICE,
        title="Energy advisor",
        description="Tips based on your load curve.\nSecond line.",
        purpose="We advise households.",
        policy_uri="https://example.org/privacy?lang=de#data",
        data_need=need(
            energy_type=GAS,
            data_tags=["7-0:3.0.0", "7-0:3.1.0"],
            min_granularity=Duration(seconds=300),
            max_granularity=Duration(seconds=3600),
            history=Duration(seconds=0),
            duration=Duration(seconds=90 * DAY, nanos=5),
            regions=["AT-9", "DE"],
        ),
    )
    created = await create_as(ep, sent)
    assert created.name.startswith("dataRequests/")
    assert len(created.name) > len("dataRequests/")
    for field in ("kind", "title", "description", "purpose", "policy_uri", "data_need"):
        assert getattr(created, field) == getattr(sent, field), field
    assert ep.account is not None
    assert created.owner == ep.account.name
    assert created.owner_display_name == "Wien Energie"
    assert created.state == DataRequest.STATE_OPEN
    assert created.create_time.seconds > 0
    assert not created.HasField("close_time")
    assert await get_as(ep, created.name) == created


async def test_create_ignores_output_only_fields_and_normalizes_input(
    marketplace: RunningMarketplace,
) -> None:
    ep = await marketplace.eligible_party()
    sent = data_request(
        name="dataRequests/chosen-by-client",
        kind=DataRequest.KIND_UNSPECIFIED,
        title="  Padded title  ",
        owner="accounts/someone-else",
        owner_display_name="Impostor",
        state=DataRequest.STATE_CLOSED,
        create_time=Timestamp(seconds=1),
        close_time=Timestamp(seconds=2),
        data_need=need(regions=["at-9", "de"]),
    )
    created = await create_as(ep, sent)
    assert created.name != "dataRequests/chosen-by-client"
    assert created.kind == REQUEST
    assert created.title == "Padded title"
    assert ep.account is not None
    assert created.owner == ep.account.name
    assert created.owner_display_name == ep.account.display_name
    assert created.state == DataRequest.STATE_OPEN
    assert created.create_time.seconds > 2
    assert not created.HasField("close_time")
    assert list(created.data_need.regions) == ["AT-9", "DE"]


async def test_customers_cannot_create_data_requests(marketplace: RunningMarketplace) -> None:
    customer = await marketplace.customer()
    await expect_error(create_as(customer), grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")


async def test_calls_without_a_token_are_unauthenticated(marketplace: RunningMarketplace) -> None:
    anonymous = marketplace.client()
    await expect_error(create_as(anonymous), grpc.StatusCode.UNAUTHENTICATED)
    await expect_error(list_as(anonymous), grpc.StatusCode.UNAUTHENTICATED)


# --- request_id (AIP-155) ---


async def test_a_retried_create_with_the_same_request_id_returns_the_first(
    marketplace: RunningMarketplace,
) -> None:
    ep = await marketplace.eligible_party()
    first = await create_as(ep, request_id="3f1c9a52-6f0e-4d7e-9a55-2d9b8a1e7c10")
    again = await create_as(ep, request_id="3f1c9a52-6f0e-4d7e-9a55-2d9b8a1e7c10")
    assert again == first
    assert ep.account is not None
    assert (await list_as(ep, owner=ep.account.name)).total_size == 1


async def test_a_request_id_reused_for_other_content_is_invalid(marketplace: RunningMarketplace) -> None:
    ep = await marketplace.eligible_party()
    await create_as(ep, request_id="req-1")
    await expect_error(
        create_as(ep, data_request(title="Something else"), request_id="req-1"),
        INVALID,
        "REQUEST_ID_REUSED",
        "request_id",
    )


async def test_request_ids_are_scoped_to_the_caller(marketplace: RunningMarketplace) -> None:
    one, two = await marketplace.eligible_party(), await marketplace.eligible_party()
    mine = await create_as(one, request_id="same")
    theirs = await create_as(two, request_id="same")
    assert mine.name != theirs.name
    assert theirs.owner != mine.owner


async def test_concurrent_creates_with_one_request_id_create_one_request(
    marketplace: RunningMarketplace,
) -> None:
    ep = await marketplace.eligible_party()
    results = await asyncio.gather(*(create_as(ep, request_id="concurrent-1") for _ in range(5)))
    assert len({r.name for r in results}) == 1
    assert ep.account is not None
    assert (await list_as(ep, owner=ep.account.name)).total_size == 1


# --- get and close ---


async def test_anyone_signed_in_can_get_a_data_request(marketplace: RunningMarketplace) -> None:
    created = await create_as(await marketplace.eligible_party())
    assert await get_as(await marketplace.customer(), created.name) == created
    assert await get_as(await marketplace.eligible_party(), created.name) == created


@pytest.mark.parametrize("name", ["", "dataRequests/", "dataRequests/a/b", "accounts/abc", "dataRequests/ä"])
async def test_get_with_a_malformed_name_is_invalid(marketplace: RunningMarketplace, name: str) -> None:
    await expect_error(get_as(await marketplace.customer(), name), INVALID, field="name")


async def test_get_of_an_unknown_data_request_is_not_found(marketplace: RunningMarketplace) -> None:
    customer = await marketplace.customer()
    await expect_error(get_as(customer, "dataRequests/doesnotexist"), grpc.StatusCode.NOT_FOUND)


async def test_the_owner_closes_and_closing_again_changes_nothing(marketplace: RunningMarketplace) -> None:
    ep = await marketplace.eligible_party()
    created = await create_as(ep)
    closed = await close_as(ep, created.name)
    assert closed.state == DataRequest.STATE_CLOSED
    assert closed.close_time.seconds >= created.create_time.seconds
    assert closed.title == created.title
    assert await close_as(ep, created.name) == closed
    assert await get_as(ep, created.name) == closed


async def test_another_eligible_party_cannot_close(marketplace: RunningMarketplace) -> None:
    created = await create_as(await marketplace.eligible_party())
    other = await marketplace.eligible_party()
    await expect_error(close_as(other, created.name), grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER")
    assert (await get_as(other, created.name)).state == DataRequest.STATE_OPEN


async def test_a_customer_cannot_close(marketplace: RunningMarketplace) -> None:
    created = await create_as(await marketplace.eligible_party())
    customer = await marketplace.customer()
    await expect_error(
        close_as(customer, created.name), grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"
    )


async def test_closing_unknown_or_malformed_names(marketplace: RunningMarketplace) -> None:
    ep = await marketplace.eligible_party()
    await expect_error(close_as(ep, "dataRequests/doesnotexist"), grpc.StatusCode.NOT_FOUND)
    await expect_error(close_as(ep, "data/xyz"), INVALID, field="name")
