"""Workflow 6 on PostgreSQL: the same behaviour where concurrency differs most (row locks, READ COMMITTED)."""

from __future__ import annotations

import pytest

from tests.marketplace import test_access as access
from tests.marketplace import test_activities as activities
from tests.marketplace import test_consent as consent
from tests.marketplace import test_receipts as receipts
from tests.support.access import aiida
from tests.support.aiida_double import RunningAiida
from tests.support.marketplace import RunningMarketplace

__all__ = ["aiida"]  # fixture

pytestmark = pytest.mark.postgres


async def test_request_access_and_its_request_id(
    pg_marketplace: RunningMarketplace, aiida: RunningAiida
) -> None:
    await access.test_a_repeated_request_id_returns_the_first_result(pg_marketplace, aiida)


async def test_unmatched_instances_create_nothing(
    pg_marketplace: RunningMarketplace, aiida: RunningAiida
) -> None:
    await access.test_request_access_for_an_unmatched_instance_creates_nothing(pg_marketplace, aiida)


async def test_two_concurrent_decisions_cannot_both_win(
    pg_marketplace: RunningMarketplace, aiida: RunningAiida
) -> None:
    await consent.test_two_concurrent_decisions_cannot_both_win(pg_marketplace, aiida)


async def test_watch_follows_the_whole_lifecycle(
    pg_marketplace: RunningMarketplace, aiida: RunningAiida
) -> None:
    await access.test_watch_permissions_follows_pending_accepted_active_and_rejected(pg_marketplace, aiida)


async def test_terminate_and_revoke_reach_the_aiida(
    pg_marketplace: RunningMarketplace, aiida: RunningAiida
) -> None:
    await access.test_the_eligible_party_terminates_a_permission(pg_marketplace, aiida)


async def test_statuses_and_a_hostile_aiida(pg_marketplace: RunningMarketplace, aiida: RunningAiida) -> None:
    await access.test_a_hostile_aiida_cannot_change_another_instances_permission(pg_marketplace, aiida)


async def test_concurrent_decisions_of_one_customer_keep_one_receipt_chain(
    pg_marketplace: RunningMarketplace, aiida: RunningAiida
) -> None:
    await receipts.test_concurrent_decisions_of_one_customer_do_not_fork_the_chain(pg_marketplace, aiida)


async def test_receipt_chain_verifies(pg_marketplace: RunningMarketplace, aiida: RunningAiida) -> None:
    await receipts.test_approve_reject_and_revoke_make_a_three_receipt_chain_that_verifies_offline(
        pg_marketplace, aiida
    )


async def test_activity_feed_pages(pg_marketplace: RunningMarketplace, aiida: RunningAiida) -> None:
    await activities.test_paging_one_at_a_time_walks_the_same_feed(pg_marketplace, aiida)
