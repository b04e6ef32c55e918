"""One rule per resource name: every RPC that names a data request answers a bad or unknown one alike."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from eddie.marketplace.v1 import access_pb2, data_request_pb2
from eddie_client import Session
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

SEARCH_ID = "s" * 20


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def eligible_party(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Session]:
    running: RunningMarketplace = await start_marketplace(test_config(tmp_path_factory.mktemp("names")))
    try:
        yield await running.eligible_party("Names Inc.")
    finally:
        await running.channel.close()
        await running.app.stop(0.5)


async def _code(call: object) -> grpc.StatusCode:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _answers(client: Session, name: str) -> dict[str, grpc.StatusCode]:
    """The status of each RPC that names the data request `name`."""
    md = client.metadata
    calls = {
        "GetDataRequest": client.data_requests.GetDataRequest(
            data_request_pb2.GetDataRequestRequest(name=name), metadata=md
        ),
        "SearchInstances": client.data_requests.SearchInstances(
            data_request_pb2.SearchInstancesRequest(data_request=name), metadata=md
        ),
        "GetSearch": client.data_requests.GetSearch(
            data_request_pb2.GetSearchRequest(name=f"{name}/searches/{SEARCH_ID}"), metadata=md
        ),
        "RequestAccess": client.access.RequestAccess(
            access_pb2.RequestAccessRequest(
                data_request=name, instance_ids=["box-1"], sink_uri="grpc://sink.example:50061"
            ),
            metadata=md,
        ),
        "ListPermissions": client.access.ListPermissions(
            access_pb2.ListPermissionsRequest(data_request=name), metadata=md
        ),
    }
    return {rpc: await _code(call) for rpc, call in calls.items()}


@pytest.mark.parametrize(
    ("id_length", "expected"),
    [
        (20, grpc.StatusCode.NOT_FOUND),
        (40, grpc.StatusCode.INVALID_ARGUMENT),
        (64, grpc.StatusCode.INVALID_ARGUMENT),
        (70, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_every_rpc_answers_a_data_request_name_alike(
    eligible_party: Session, id_length: int, expected: grpc.StatusCode
) -> None:
    answers = await _answers(eligible_party, "dataRequests/" + "a" * id_length)
    assert answers == dict.fromkeys(answers, expected)


@pytest.mark.parametrize("name", ["dataRequests/", "dataRequests/a b", "dataRequests/a/b", "requests/abc"])
async def test_every_rpc_refuses_a_malformed_data_request_name_alike(
    eligible_party: Session, name: str
) -> None:
    answers = await _answers(eligible_party, name)
    assert answers == dict.fromkeys(answers, grpc.StatusCode.INVALID_ARGUMENT)
