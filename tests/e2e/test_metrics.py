"""/metrics of the three programs, run as real processes with --metrics-listen: figures follow the work.

A search adds one observation to `marketplace_search_seconds` and its answers to
`marketplace_search_answers`; an approved access makes the AIIDA publish readings and the sink
store them, which raises `aiida_readings_published` and `sink_readings_stored`; every RPC is
counted per method and code.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eddie_client import procs
from eddie_client.client import ROLE_CUSTOMER, ROLE_ELIGIBLE_PARTY, MarketplaceClient, data_need
from tests.support.expect import eventually

pytestmark = pytest.mark.e2e

PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"
METRICS = ("--metrics-listen", "127.0.0.1:0")
PASSWORD = "metrics passphrase"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Watched:
    marketplace: procs.Proc
    sink: procs.Proc
    aiida: procs.Proc

    @staticmethod
    def metrics_address(proc: procs.Proc) -> str:
        for line in proc.lines:
            match = re.fullmatch(r"metrics on (\S+:\d+)", line)
            if match:
                return match.group(1)
        raise AssertionError(f"{proc.name} printed no `metrics on HOST:PORT`: {proc.lines}")


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Watched]:
    started: list[procs.Proc] = []
    try:
        mp = procs.start_marketplace(tmp_path / "mp", tmp_path, *METRICS)
        started.append(mp)
        sink, aiida = procs.start_all(  # both need only the marketplace: they start together
            [
                lambda: procs.start_sink(mp.address, tmp_path / "sink", tmp_path, *METRICS),
                lambda: procs.start_aiida(
                    mp.address,
                    tmp_path / "alice",
                    PROFILES / "vienna-p1.toml",
                    tmp_path,
                    *("--instance-id", "aiida-alice", "--pairing-code", "ALICE-2026", "--time-scale", "60"),
                    *METRICS,
                ),
            ]
        )
        started += [sink, aiida]
        yield Watched(mp, sink, aiida)
    finally:
        procs.stop_all(started)


async def scrape(proc: procs.Proc) -> Samples:
    address = Watched.metrics_address(proc)

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_searches_and_readings(watched: Watched) -> None:
    before = await scrape(watched.marketplace)
    assert value(before, "marketplace_search_seconds_count") == 0
    assert ("marketplace_permissions", (("state", "active"),)) in before
    assert value(before, "marketplace_outbox_pending") == 0

    mp = MarketplaceClient(watched.marketplace.address)
    ep = await mp.sign_up(ROLE_ELIGIBLE_PARTY, "ep@metrics.example", PASSWORD, "Metrics EP")
    alice = await mp.sign_up(ROLE_CUSTOMER, "alice@metrics.example", PASSWORD, "Alice")
    await alice.claim("aiida-alice", "ALICE-2026", wait=20)
    await eventually(lambda: _connected(watched), 20, "the AIIDA connected", step=0.2)

    request = await ep.create_data_request(
        "Load study", "Grid planning", data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 180, ["AT"])
    )
    matches, _ = await ep.search(request.name, timeout=3)
    assert matches == ["aiida-alice"]
    after_search = await scrape(watched.marketplace)
    assert value(after_search, "marketplace_search_seconds_count") == 1
    assert value(after_search, "marketplace_search_answers_total", kind="matched") == 1
    assert value(after_search, "marketplace_searches_withheld_total") == 0
    stored = ("marketplace_db_statements_total", {"verb": "insert", "table": "searches"})
    assert value(after_search, stored[0], **stored[1]) - value(before, stored[0], **stored[1]) == 1
    search_calls = {
        "grpc_service": "eddie.marketplace.v1.DataRequestService",
        "grpc_method": "SearchInstances",
    }
    assert value(after_search, "grpc_server_handled_total", **search_calls, grpc_code="OK") == 1
    assert value(after_search, "grpc_server_handling_seconds_count", **search_calls) == 1

    (permission,) = await ep.request_access(request.name, matches, f"grpc://{watched.sink.address}")
    await alice.decide(permission.name, approve=True)
    stored = await eventually(lambda: _positive(watched.sink, "sink_readings_stored_total"), 20, step=0.2)
    published = await eventually(
        lambda: _positive(watched.aiida, "aiida_readings_published_total"), 20, step=0.2
    )
    assert stored > 0 and published > 0
    aiida = await scrape(watched.aiida)
    assert (
        value(aiida, "aiida_accesses", state="active") + value(aiida, "aiida_accesses", state="fulfilled")
        == 1
    )
    sink = await scrape(watched.sink)
    publish = {"grpc_service": "eddie.framework.v1.DataSinkService", "grpc_method": "Publish"}
    assert value(sink, "grpc_server_handled_total", **publish, grpc_code="OK") >= 1
    market = await scrape(watched.marketplace)
    granted = sum(
        value(market, "marketplace_permissions", state=s) for s in ("accepted", "active", "fulfilled")
    )
    assert granted == 1, {k: v for k, v in market.items() if k[0] == "marketplace_permissions"}


async def _connected(watched: Watched) -> bool | None:
    samples = await scrape(watched.marketplace)
    return value(samples, "marketplace_connected_instances") == 1 or None


async def _positive(proc: procs.Proc, name: str) -> float | None:
    found = value(await scrape(proc), name)
    return found if found > 0 else None
