"""Faults between replicas (three in-process replicas on PostgreSQL + NATS): lost search replies fail
the search loudly; a lost event publish is repaired from the database while the stream stays open."""

from __future__ import annotations

import secrets

import grpc
import pytest

from tests.cluster.test_replicas import as_client, claimed_on_double, create_request, search
from tests.support.aiida_double import AiidaDouble, start_aiida
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

pytestmark = [pytest.mark.postgres, pytest.mark.nats]


async def test_a_search_whose_inbox_dropped_replies_fails_with_search_incomplete(
    replicas: list[RunningMarketplace],
) -> None:
    a, b, _ = replicas
    double = await start_aiida(AiidaDouble())
    try:
        customer = await a.customer()
        await claimed_on_double(replicas, double, customer, f"s-{secrets.token_hex(4)}")
        ep = await a.eligible_party()
        request = await create_request(ep)
        node = b.app.cluster
        assert node is not None
        matched, summary = await search(as_client(b, ep), request.name)
        assert len(matched) == 1 and summary.unreachable == 0 and summary.timed_out == 0

        # nats-py drops what would exceed a subscription's pending limit (a slow consumer) and reports
        # it; with a one-byte limit every reply to b's inbox is dropped.
        node.inbox_pending_bytes = 1
        await expect_error(
            search(as_client(b, ep), request.name), grpc.StatusCode.UNAVAILABLE, "SEARCH_INCOMPLETE"
        )
        assert node.searches_incomplete == 1
        assert not node._inboxes, "the failed search's inbox is forgotten"

        node.inbox_pending_bytes = 64 * 1024 * 1024
        matched, summary = await search(as_client(b, ep), request.name)
        assert len(matched) == 1 and summary.unreachable == 0 and summary.timed_out == 0
        assert node.searches_incomplete == 1
    finally:
        await double.stop()
