"""The cluster benchmark's helpers (bench/cluster.py) and the counters it reads; never the benchmark."""

from __future__ import annotations

import secrets

import nats
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bench.cluster import (
    consistent,
    family_sum,
    is_exact,
    label_sums,
    net_per_search,
    time_to_exact,
)
from bench.scrape import parse_counters
from marketplace_server.metrics import NatsStats, statement_labels
from tests.cluster.test_events import NATS_URL, nats_reachable

EXPOSITION = """\
# HELP marketplace_db_statements_total SQL statements
# TYPE marketplace_db_statements_total counter
marketplace_db_statements_total{table="bucket_leases",verb="update"} 12.0
marketplace_db_statements_total{table="bucket_leases",verb="select"} 3.0
marketplace_db_statements_total{table="replicas",verb="insert"} 6.0
# HELP marketplace_nats_messages_total NATS messages
# TYPE marketplace_nats_messages_total counter
marketplace_nats_messages_total{direction="in"} 40.0
marketplace_nats_messages_total{direction="out"} 41.0
# HELP marketplace_connected_instances AIIDAs
# TYPE marketplace_connected_instances gauge
marketplace_connected_instances 7.0
"""


def test_counters_parse_by_name_and_sorted_labels_and_sum_by_label() -> None:
    values = parse_counters(EXPOSITION)
    assert values['marketplace_nats_messages_total{direction="out"}'] == 41
    assert values["marketplace_connected_instances"] == 7
    assert family_sum(values, "marketplace_db_statements_total") == 21
    assert family_sum(values, "marketplace_db_statements") == 0  # a prefix is not the family
    assert label_sums(values, "marketplace_db_statements_total", "table") == {
        "bucket_leases": 15,
        "replicas": 6,
    }
    assert label_sums(values, "marketplace_db_statements_total", "verb") == {
        "update": 12,
        "select": 3,
        "insert": 6,
    }


def test_exact_means_every_claimed_instance_answered() -> None:
    exact = {"queried": 10, "matched": 5, "not_matched": 5, "unreachable": 0, "timed_out": 0}
    assert is_exact(exact, 10) and consistent(exact, 10)
    taken_over = {"queried": 10, "matched": 4, "not_matched": 3, "unreachable": 3, "timed_out": 0}
    assert not is_exact(taken_over, 10) and consistent(taken_over, 10)
    short = {"queried": 9, "matched": 5, "not_matched": 4, "unreachable": 0, "timed_out": 0}
    assert not is_exact(short, 10) and not consistent(short, 10)
    counted_twice = {"queried": 10, "matched": 6, "not_matched": 5, "unreachable": 0, "timed_out": 0}
    assert not is_exact(counted_twice, 10) and not consistent(counted_twice, 10)


def test_time_to_exact_is_the_first_exact_search_after_the_last_inexact_one() -> None:
    assert time_to_exact([]) is None
    assert time_to_exact([(0.0, 3.0, False), (0.5, 3.5, False)]) is None
    samples = [(-0.5, 2.5, False), (0.0, 0.2, True), (0.5, 3.5, False), (9.0, 9.3, True), (9.5, 9.7, True)]
    assert time_to_exact(samples) == (9.0, 9.3)
    assert time_to_exact(list(reversed(samples))) == (9.0, 9.3)  # by start time, not by order given
    assert time_to_exact([(9.0, 9.3, True), (9.5, 12.5, False)]) is None


def test_net_per_search_takes_the_idle_rate_off() -> None:
    assert net_per_search(delta=110.0, idle_per_s=2.0, seconds=5.0, searches=10) == 10.0
    assert net_per_search(delta=10.0, idle_per_s=0.0, seconds=5.0, searches=10) == 1.0


def test_statements_are_labelled_by_verb_and_this_schemas_tables_only() -> None:
    assert statement_labels("SELECT bucket_leases.bucket FROM bucket_leases WHERE x") == (
        "select",
        "bucket_leases",
    )
    assert statement_labels("INSERT INTO replicas (id) VALUES ($1) ON CONFLICT (id) DO UPDATE") == (
        "insert",
        "replicas",
    )
    assert statement_labels('UPDATE "instances" SET last_seen_time=$1') == ("update", "instances")
    assert statement_labels("SELECT count(*) AS n FROM (SELECT 1 FROM searches) AS s") == (
        "select",
        "searches",
    )
    assert statement_labels("select pg_catalog.version()") == ("select", "other")
    assert statement_labels("DELETE FROM secret_table") == ("delete", "other")
    assert statement_labels("SAVEPOINT x") == ("other", "other")


@pytest.mark.nats
async def test_nats_counters_follow_the_clients_messages() -> None:
    if not nats_reachable():
        pytest.skip(f"NATS is unreachable at {NATS_URL}")
    nc = await nats.connect(NATS_URL)
    try:
        registry = CollectorRegistry()
        registry.register(NatsStats(nc))
        subject = f"test-bench-{secrets.token_hex(6)}"
        subscription = await nc.subscribe(subject)
        before = parse_counters(generate_latest(registry).decode())
        for _ in range(3):
            await nc.publish(subject, b"12345")
        await nc.flush()
        for _ in range(3):
            await subscription.next_msg(timeout=5)
        after = parse_counters(generate_latest(registry).decode())
    finally:
        await nc.close()
    out = 'marketplace_nats_messages_total{direction="out"}'
    sent = 'marketplace_nats_bytes_total{direction="out"}'
    assert after[out] - before[out] == 3
    assert after[sent] - before[sent] == 15
    received = 'marketplace_nats_messages_total{direction="in"}'
    assert after[received] - before[received] == 3
    assert (
        after['marketplace_nats_bytes_total{direction="in"}']
        - before['marketplace_nats_bytes_total{direction="in"}']
        == 15
    )
