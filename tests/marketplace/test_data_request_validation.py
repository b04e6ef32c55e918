"""Every CreateDataRequest input rule, through one shared server: each violation names its field path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration

from eddie.marketplace.v1 import data_request_pb2
from eddie_client.client import Session
from eddie_common.interceptors import bad_request
from tests.support.data_requests import DAY, create_as, data_request, need, serving
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

pytestmark = pytest.mark.asyncio(loop_scope="module")

DR = "data_request"
NEED = "data_request.data_need"
YEAR = 365 * DAY + DAY // 4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningMarketplace]:
    async with serving(tmp_path_factory.mktemp("validation")) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ep(shared: RunningMarketplace) -> Session:
    return await shared.eligible_party()


def without_need() -> data_request_pb2.DataRequest:
    dr = data_request()
    dr.ClearField("data_need")
    return dr


def tags(n: int) -> list[str]:
    return [f"1-0:{i // 256}.{i % 256}.0" for i in range(n)]


def regions(n: int) -> list[str]:
    return [f"AT-{i}" for i in range(n)]


INVALID_CASES: list[tuple[str, data_request_pb2.DataRequest, str]] = [
    ("title empty", data_request(title=""), f"{DR}.title"),
    ("title blank", data_request(title="   "), f"{DR}.title"),
    ("title too long", data_request(title="x" * 201), f"{DR}.title"),
    ("title newline", data_request(title="two\nlines"), f"{DR}.title"),
    ("title NUL", data_request(title="a\x00b"), f"{DR}.title"),
    ("title bidi override", data_request(title="abc\u202edef"), f"{DR}.title"),
    ("description too long", data_request(description="d" * 5001), f"{DR}.description"),
    ("description bell", data_request(description="ding\x07"), f"{DR}.description"),
    ("purpose empty", data_request(purpose=""), f"{DR}.purpose"),
    ("purpose too long", data_request(purpose="p" * 2001), f"{DR}.purpose"),
    ("policy http", data_request(policy_uri="http://example.org/privacy"), f"{DR}.policy_uri"),
    ("policy no host", data_request(policy_uri="https:///privacy"), f"{DR}.policy_uri"),
    ("policy bare scheme", data_request(policy_uri="https://"), f"{DR}.policy_uri"),
    ("policy userinfo", data_request(policy_uri="https://user:pw@example.org/p"), f"{DR}.policy_uri"),
    ("policy space", data_request(policy_uri="https://example.org/a b"), f"{DR}.policy_uri"),
    ("policy control", data_request(policy_uri="https://example.org/\x01"), f"{DR}.policy_uri"),
    ("policy javascript", data_request(policy_uri="javascript:alert(1)"), f"{DR}.policy_uri"),
    ("policy relative", data_request(policy_uri="//example.org/privacy"), f"{DR}.policy_uri"),
    ("policy bad port", data_request(policy_uri="https://example.org:99999/"), f"{DR}.policy_uri"),
    ("policy bad host", data_request(policy_uri="https://exa_mple.org/"), f"{DR}.policy_uri"),
    ("policy non-ascii", data_request(policy_uri="https://exämple.org/"), f"{DR}.policy_uri"),
    ("policy too long", data_request(policy_uri="https://example.org/" + "a" * 2030), f"{DR}.policy_uri"),
    ("kind unknown", data_request(kind=7), f"{DR}.kind"),
    ("data need missing", without_need(), NEED),
    ("energy type unset", data_request(data_need=need(energy_type=0)), f"{NEED}.energy_type"),
    ("energy type unknown", data_request(data_need=need(energy_type=99)), f"{NEED}.energy_type"),
    ("no data tags", data_request(data_need=need(data_tags=[])), f"{NEED}.data_tags"),
    ("65 data tags", data_request(data_need=need(data_tags=tags(65))), f"{NEED}.data_tags"),
    ("short tag", data_request(data_need=need(data_tags=["1-0:1.8.0", "1-0:1.8"])), f"{NEED}.data_tags[1]"),
    ("tag with suffix", data_request(data_need=need(data_tags=["1-0:1.8.0*255"])), f"{NEED}.data_tags[0]"),
    ("tag group > 255", data_request(data_need=need(data_tags=["1-0:1.8.256"])), f"{NEED}.data_tags[0]"),
    (
        "tag non-ASCII digit",
        data_request(data_need=need(data_tags=["\uff11-0:1.8.0"])),
        f"{NEED}.data_tags[0]",
    ),
    (
        "tag blank",
        data_request(data_need=need(data_tags=["1-0:1.8.0", "1-0:2.8.0", ""])),
        f"{NEED}.data_tags[2]",
    ),
    (
        "duplicate tag",
        data_request(data_need=need(data_tags=["1-0:1.8.0", "1-0:1.8.0"])),
        f"{NEED}.data_tags[1]",
    ),
    (
        "min granularity zero",
        data_request(data_need=need(min_granularity=Duration())),
        f"{NEED}.min_granularity",
    ),
    (
        "min granularity negative",
        data_request(data_need=need(min_granularity=Duration(seconds=-60))),
        f"{NEED}.min_granularity",
    ),
    (
        "max below min",
        data_request(
            data_need=need(min_granularity=Duration(seconds=900), max_granularity=Duration(seconds=60))
        ),
        f"{NEED}.max_granularity",
    ),
    (
        "max granularity above 31 days",
        data_request(data_need=need(max_granularity=Duration(seconds=31 * DAY + 1))),
        f"{NEED}.max_granularity",
    ),
    (
        "mixed signs",
        data_request(data_need=need(min_granularity=Duration(seconds=60, nanos=-1))),
        f"{NEED}.min_granularity",
    ),
    (
        "nanos out of range",
        data_request(data_need=need(max_granularity=Duration(seconds=60, nanos=1_000_000_000))),
        f"{NEED}.max_granularity",
    ),
    ("history negative", data_request(data_need=need(history=Duration(nanos=-1))), f"{NEED}.history"),
    (
        "history above 50 years",
        data_request(data_need=need(history=Duration(seconds=50 * YEAR + 1))),
        f"{NEED}.history",
    ),
    (
        "history huge seconds",
        data_request(data_need=need(history=Duration(seconds=10**12))),
        f"{NEED}.history",
    ),
    ("duration zero", data_request(data_need=need(duration=Duration())), f"{NEED}.duration"),
    ("duration negative", data_request(data_need=need(duration=Duration(seconds=-DAY))), f"{NEED}.duration"),
    (
        "duration above 10 years",
        data_request(data_need=need(duration=Duration(seconds=10 * YEAR + 1))),
        f"{NEED}.duration",
    ),
    ("unknown country", data_request(data_need=need(regions=["AT", "XX"])), f"{NEED}.regions[1]"),
    ("empty subdivision", data_request(data_need=need(regions=["AT-"])), f"{NEED}.regions[0]"),
    ("long subdivision", data_request(data_need=need(regions=["AT-1234"])), f"{NEED}.regions[0]"),
    ("alpha-3 code", data_request(data_need=need(regions=["AUT"])), f"{NEED}.regions[0]"),
    ("one letter", data_request(data_need=need(regions=["A"])), f"{NEED}.regions[0]"),
    ("padded region", data_request(data_need=need(regions=[" AT"])), f"{NEED}.regions[0]"),
    ("non-ASCII region", data_request(data_need=need(regions=["\u0131T"])), f"{NEED}.regions[0]"),
    ("duplicate region", data_request(data_need=need(regions=["AT-9", "at-9"])), f"{NEED}.regions[1]"),
    ("65 regions", data_request(data_need=need(regions=regions(65))), f"{NEED}.regions"),
]


@pytest.mark.parametrize(
    ("dr", "field"), [pytest.param(dr, field, id=case) for case, dr, field in INVALID_CASES]
)
async def test_an_invalid_field_is_named(ep: Session, dr: data_request_pb2.DataRequest, field: str) -> None:
    err = await expect_error(create_as(ep, dr), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", field)
    bad = bad_request(err)
    assert bad is not None
    assert [v.field for v in bad.field_violations] == [field]


@pytest.mark.parametrize("request_id", ["has space", "x" * 65, "ümlaut", "a/b"])
async def test_a_malformed_request_id_is_named(ep: Session, request_id: str) -> None:
    await expect_error(
        create_as(ep, request_id=request_id), grpc.StatusCode.INVALID_ARGUMENT, field="request_id"
    )


async def test_a_missing_data_request_is_named(ep: Session) -> None:
    request = data_request_pb2.CreateDataRequestRequest()
    call = ep.data_requests.CreateDataRequest(request, metadata=ep.metadata)
    await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, field="data_request")


async def test_all_violations_are_reported_together(ep: Session) -> None:
    dr = data_request(title="", purpose="", data_need=need(energy_type=0, data_tags=["bad"], regions=["XX"]))
    err = await expect_error(create_as(ep, dr, request_id="bad id"), grpc.StatusCode.INVALID_ARGUMENT)
    bad = bad_request(err)
    assert bad is not None
    assert {v.field for v in bad.field_violations} == {
        "request_id",
        f"{DR}.title",
        f"{DR}.purpose",
        f"{NEED}.energy_type",
        f"{NEED}.data_tags[0]",
        f"{NEED}.regions[0]",
    }


VALID_EDGES: list[tuple[str, dict[str, Any]]] = [
    ("title of 200", {"title": "t" * 200}),
    (
        "title with emoji and no-break space",
        {"title": "Heat\u00a0pumps \U0001f468\u200d\U0001f469\u200d\U0001f467"},
    ),
    ("description of 5000 with newlines and tabs", {"description": ("line\tx\r\n" * 625)[:5000]}),
    ("purpose of 2000", {"purpose": "p" * 2000}),
    ("no policy", {"policy_uri": ""}),
    ("policy with port, query, fragment", {"policy_uri": "https://example.org:8443/p?a=1&b=%20#x"}),
    ("policy on IPv6", {"policy_uri": "https://[2001:db8::1]/privacy"}),
    ("data service", {"kind": data_request_pb2.DataRequest.KIND_DATA_SERVICE}),
    ("64 tags", {"data_need": need(data_tags=tags(64))}),
    ("64 regions", {"data_need": need(regions=regions(64))}),
    ("anywhere", {"data_need": need(regions=[])}),
    (
        "min equals max, 31 days",
        {
            "data_need": need(
                min_granularity=Duration(seconds=31 * DAY), max_granularity=Duration(seconds=31 * DAY)
            )
        },
    ),
    (
        "sub-second granularity",
        {"data_need": need(min_granularity=Duration(nanos=1), max_granularity=Duration(nanos=500))},
    ),
    ("no history, 10 years", {"data_need": need(history=Duration(), duration=Duration(seconds=10 * YEAR))}),
    ("50 years of history", {"data_need": need(history=Duration(seconds=50 * YEAR))}),
]


@pytest.mark.parametrize(("overrides"), [pytest.param(o, id=case) for case, o in VALID_EDGES])
async def test_edge_values_are_accepted(ep: Session, overrides: dict[str, Any]) -> None:
    created = await create_as(ep, data_request(**overrides))
    assert created.state == data_request_pb2.DataRequest.STATE_OPEN
