"""Workflow 3 through a real server: browsing with filters, keyset pages and page tokens.

One server is seeded once with the catalogue of data_request_support.SEEDS (25
requests of three eligible parties, 3 closed); tests read it and compare pages
with an independent oracle (`Catalogue.expected`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from marketplace_server.pagination import PageTokenCodec
from marketplace_server.services.data_requests import METHOD_LIST, ListFilters
from tests.support.data_requests import (
    ELECTRICITY,
    GAS,
    HEAT,
    REQUEST,
    SERVICE,
    Catalogue,
    all_pages,
    chunks,
    create_as,
    data_request,
    list_as,
    need,
    seed_catalogue,
    serving,
)
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

pytestmark = pytest.mark.asyncio(loop_scope="module")

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def marketplace(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningMarketplace]:
    async with serving(tmp_path_factory.mktemp("browsing")) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def catalogue(marketplace: RunningMarketplace) -> Catalogue:
    """The seeded catalogue; tests using it only read."""
    return await seed_catalogue(marketplace)


@pytest_asyncio.fixture(loop_scope="module")
async def fresh(tmp_path: Path) -> AsyncIterator[tuple[RunningMarketplace, Catalogue]]:
    """A server and catalogue of its own, for a test that adds requests."""
    async with serving(tmp_path) as running:
        yield running, await seed_catalogue(running)


async def test_the_default_list_is_every_open_request_newest_first(
    marketplace: RunningMarketplace, catalogue: Catalogue
) -> None:
    customer = await marketplace.customer()
    response = await list_as(customer)
    expected = catalogue.expected()
    assert [dr.title for dr in response.data_requests] == expected
    assert len(expected) == 22
    assert response.total_size == 22
    assert not response.next_page_token
    first = response.data_requests[0]
    assert first.owner == catalogue.owner_name("wien")
    assert first.owner_display_name == "Wien Energie"
    assert first.name == catalogue.names[first.title]


async def test_region_kind_pages_are_exact(marketplace: RunningMarketplace, catalogue: Catalogue) -> None:
    expected = [
        ["Last electricity study", "EU wide open data"],
        ["Balcony solar", "Austria wide survey"],
        ["Gas anywhere", "Electricity anywhere"],
        ["Vienna district heat", "Solar export survey"],
        ["Heat pump study"],
    ]
    customer = await marketplace.customer()
    assert await all_pages(customer, 2, region="AT-9", kind=REQUEST) == expected
    assert (await list_as(customer, page_size=2, region="AT-9", kind=REQUEST)).total_size == 9


async def test_a_country_filter_finds_its_subdivisions_and_closed_ones_on_request(
    marketplace: RunningMarketplace, catalogue: Catalogue
) -> None:
    customer = await marketplace.customer()
    pages = await all_pages(customer, 3, region="at", energy_type=HEAT, show_closed=True)
    assert pages == [["Salzburg heat", "Closed heat service", "Heat meters Graz"], ["Vienna district heat"]]
    assert await all_pages(customer, 3, region="AT", energy_type=HEAT) == [
        ["Salzburg heat", "Heat meters Graz", "Vienna district heat"]
    ]


async def test_a_subdivision_filter_finds_its_country_and_anywhere_but_not_siblings(
    marketplace: RunningMarketplace, catalogue: Catalogue
) -> None:
    customer = await marketplace.customer()
    at9 = [t for page in await all_pages(customer, 50, region="AT-9") for t in page]
    at = [t for page in await all_pages(customer, 50, region="AT") for t in page]
    assert "Heat pump study" in at9
    assert "Electricity anywhere" in at9
    assert "Tyrol hydrogen pilot" not in at9
    assert "Tyrol hydrogen pilot" in at
    assert "Bavarian load profiles" not in at
    assert "Bavarian load profiles" not in at9
    fr7 = [t for page in await all_pages(customer, 50, region="FR-7") for t in page]
    assert "Paris suburbs" in fr7
    assert "EU wide open data" in fr7
    assert "Paris flats" not in fr7


async def test_text_is_a_case_insensitive_substring_with_literal_wildcards(
    marketplace: RunningMarketplace, catalogue: Catalogue
) -> None:
    customer = await marketplace.customer()

    async def titles(text: str) -> list[str]:
        return [dr.title for dr in (await list_as(customer, text=text)).data_requests]

    assert await titles("SOLAR") == [
        "Balcony solar",
        "Smart charging service",
        "Paris suburbs",
        "Solar export survey",
    ]
    assert await titles("%") == ["Solar export survey"]
    assert await titles("_") == ["Berlin tenants", "Gas boiler offer"]
    assert await titles("r_o") == ["Gas boiler offer"]  # unescaped, `_` would also match "roofs"
    assert await titles("heat pumps change") == ["Heat pump study"]  # the description
    assert await titles("no such words") == []


async def test_every_filter_combination_pages_like_the_oracle(
    marketplace: RunningMarketplace, catalogue: Catalogue
) -> None:
    customer = await marketplace.customer()
    combos: list[dict[str, object]] = [
        {},
        {"show_closed": True},
        {"kind": SERVICE},
        {"energy_type": ELECTRICITY, "region": "AT-9"},
        {"energy_type": GAS, "show_closed": True},
        {"region": "DE"},
        {"region": "DE-BY", "kind": REQUEST},
        {"owner": catalogue.owner_name("lab"), "show_closed": True},
        {"owner": catalogue.owner_name("wien"), "region": "AT", "text": "s"},
        {"text": "study", "show_closed": True},
        {"region": "US"},
    ]
    for filters in combos:
        expected = catalogue.expected(**filters)  # type: ignore[arg-type]
        for size in (2, 3):
            assert await all_pages(customer, size, **filters) == chunks(expected, size), (filters, size)
            total = (await list_as(customer, page_size=size, **filters)).total_size
            assert total == len(expected), filters


async def test_new_requests_do_not_shift_the_pages_being_read(
    fresh: tuple[RunningMarketplace, Catalogue],
) -> None:
    await new_requests_do_not_shift_the_pages_being_read(*fresh)


async def new_requests_do_not_shift_the_pages_being_read(
    marketplace: RunningMarketplace, catalogue: Catalogue
) -> None:
    customer = await marketplace.customer()
    expected = catalogue.expected(region="AT-9")
    first = await list_as(customer, page_size=3, region="AT-9")
    assert [dr.title for dr in first.data_requests] == expected[:3]
    for title in ("Brand new one", "Brand new two"):
        await create_as(catalogue.clients["lab"], data_request(title=title, data_need=need(regions=["AT-9"])))
    rest: list[str] = []
    token = first.next_page_token
    while token:
        page = await list_as(customer, page_size=3, region="AT-9", page_token=token)
        rest.extend(dr.title for dr in page.data_requests)
        token = page.next_page_token
    assert rest == expected[3:]
    fresh = await list_as(customer, page_size=3, region="AT-9")
    assert [dr.title for dr in fresh.data_requests][:2] == ["Brand new two", "Brand new one"]
    assert fresh.total_size == len(expected) + 2


async def test_a_page_token_only_continues_the_same_filters(
    marketplace: RunningMarketplace, catalogue: Catalogue
) -> None:
    customer = await marketplace.customer()
    token = (await list_as(customer, page_size=2, region="AT")).next_page_token
    assert token
    await list_as(customer, page_size=5, region="at", page_token=token)  # same filters, other page size
    for changed in (
        {"region": "AT-9"},
        {"region": "AT", "kind": REQUEST},
        {"region": "AT", "show_closed": True},
    ):
        await expect_error(
            list_as(customer, page_size=2, page_token=token, **changed),
            INVALID,
            "INVALID_PAGE_TOKEN",
            "page_token",
        )


def _server_codec(marketplace: RunningMarketplace) -> PageTokenCodec:
    codec = marketplace.app.components["data_requests"].page_tokens
    assert isinstance(codec, PageTokenCodec)
    return codec


async def test_forged_tampered_and_oversized_page_tokens_are_rejected(
    marketplace: RunningMarketplace, catalogue: Catalogue
) -> None:
    customer = await marketplace.customer()
    token = (await list_as(customer, page_size=2)).next_page_token
    no_filters = asdict(ListFilters())
    middle = len(token) // 2
    bad_tokens = [
        token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :],  # tampered
        token[:-3],  # truncated
        token + "x",
        "not a page token!",
        "A" * 1025,
        PageTokenCodec(os.urandom(32)).encode(METHOD_LIST, no_filters, {"seq": 10**6}),  # forged key
        _server_codec(marketplace).encode("ListInstances", no_filters, {"seq": 10**6}),  # other method
        _server_codec(marketplace).encode(METHOD_LIST, no_filters, {"seq": "10"}),  # not an int cursor
    ]
    for bad in bad_tokens:
        await expect_error(list_as(customer, page_token=bad), INVALID, "INVALID_PAGE_TOKEN", "page_token")


async def test_page_size_defaults_caps_and_rejects_negative(
    marketplace: RunningMarketplace, catalogue: Catalogue
) -> None:
    customer = await marketplace.customer()
    await expect_error(list_as(customer, page_size=-1), INVALID, field="page_size")
    huge = await list_as(customer, page_size=2**31 - 1)
    assert len(huge.data_requests) == 22
    assert not huge.next_page_token


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"kind": 9}, "kind"),
        ({"energy_type": 42}, "energy_type"),
        ({"region": "XX"}, "region"),
        ({"region": "AT-"}, "region"),
        ({"region": "% "}, "region"),
        ({"owner": "dataRequests/abc"}, "owner"),
        ({"owner": "accounts/"}, "owner"),
        ({"text": "x" * 201}, "text"),
        ({"text": "a\x00b"}, "text"),
    ],
)
async def test_invalid_filters_are_named(
    marketplace: RunningMarketplace, filters: dict[str, object], field: str
) -> None:
    await expect_error(list_as(await marketplace.customer(), **filters), INVALID, field=field)
