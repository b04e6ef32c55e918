"""A representative subset of the data request tests against PostgreSQL (each in a fresh schema)."""

from __future__ import annotations

import asyncio

import pytest

from tests.marketplace import test_data_request_browsing as browsing
from tests.marketplace import test_data_requests as on_sqlite
from tests.support.data_requests import all_pages, create_as, data_request, list_as, seed_catalogue
from tests.support.marketplace import RunningMarketplace

pytestmark = pytest.mark.postgres


async def test_create_returns_every_field_and_get_reads_it_back(pg_marketplace: RunningMarketplace) -> None:
    await on_sqlite.test_create_returns_every_field_and_get_reads_it_back(pg_marketplace)


async def test_a_request_id_reused_for_other_content_is_invalid(pg_marketplace: RunningMarketplace) -> None:
    await on_sqlite.test_a_request_id_reused_for_other_content_is_invalid(pg_marketplace)


async def test_concurrent_creates_with_one_request_id_create_one_request(
    pg_marketplace: RunningMarketplace,
) -> None:
    await on_sqlite.test_concurrent_creates_with_one_request_id_create_one_request(pg_marketplace)


async def test_concurrent_creates_get_distinct_sequence_numbers(pg_marketplace: RunningMarketplace) -> None:
    ep, other = await pg_marketplace.eligible_party(), await pg_marketplace.eligible_party()
    titles = [f"Parallel {i}" for i in range(10)]
    await asyncio.gather(
        *(create_as(ep if i % 2 else other, data_request(title=t)) for i, t in enumerate(titles))
    )
    listed = await list_as(ep, page_size=3, text="parallel")
    assert listed.total_size == 10
    pages = await all_pages(ep, 3, text="parallel")
    assert sorted(t for page in pages for t in page) == sorted(titles)


async def test_the_owner_closes_and_closing_again_changes_nothing(pg_marketplace: RunningMarketplace) -> None:
    await on_sqlite.test_the_owner_closes_and_closing_again_changes_nothing(pg_marketplace)


async def test_browsing_with_filters_and_pages(pg_marketplace: RunningMarketplace) -> None:
    catalogue = await seed_catalogue(pg_marketplace)
    await browsing.test_the_default_list_is_every_open_request_newest_first(pg_marketplace, catalogue)
    await browsing.test_region_kind_pages_are_exact(pg_marketplace, catalogue)
    await browsing.test_a_subdivision_filter_finds_its_country_and_anywhere_but_not_siblings(
        pg_marketplace, catalogue
    )
    await browsing.test_text_is_a_case_insensitive_substring_with_literal_wildcards(pg_marketplace, catalogue)
    await browsing.test_every_filter_combination_pages_like_the_oracle(pg_marketplace, catalogue)
    await browsing.test_forged_tampered_and_oversized_page_tokens_are_rejected(pg_marketplace, catalogue)
    await browsing.new_requests_do_not_shift_the_pages_being_read(pg_marketplace, catalogue)
