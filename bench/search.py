"""W5 search benchmark: a marketplace and a fleet of N AIIDAs as separate processes vs the floor."""

from __future__ import annotations

import asyncio
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import psutil

from bench.floor import _p95
from eddie_client import ROLE_CUSTOMER, ROLE_ELIGIBLE_PARTY, MarketplaceClient, Session, data_need, procs

PASSWORD = "benchmark passphrase 2026"
PROFILES = Path(__file__).resolve().parent.parent / "aiida_stub" / "profiles"


def floor(n: int, searches: int, work: Path) -> dict[str, Any]:
    """The same broadcast over bare grpc.aio streams, in two processes of its own."""
    import json
    import subprocess
    import sys

    server = procs.start("floor-server", ["bench.floor", "serve"], work)
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.floor",
                "client",
                "--target",
                server.address,
                "--n",
                str(n),
                "--searches",
                str(searches),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        ).stdout
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result
    finally:
        server.stop()


async def _claim_all(mp: MarketplaceClient, fleet_csv: Path, n: int) -> list[Session]:
    rows = list(csv.DictReader(fleet_csv.open()))
    assert len(rows) == n, f"fleet.csv has {len(rows)} rows, expected {n}"
    customers = [
        await mp.sign_up(ROLE_CUSTOMER, f"household{i}@bench.example", PASSWORD, f"Household group {i}")
        for i in range(max(1, n // 1000))
    ]
    slots = asyncio.Semaphore(64)

    async def claim(i: int, row: dict[str, str]) -> None:
        async with slots:
            for attempt in range(100):
                try:
                    await customers[i % len(customers)].claim(row["instance_id"], row["pairing_code"])
                    return
                except Exception:
                    if attempt == 99:
                        raise
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(claim(i, row) for i, row in enumerate(rows)))
    return customers


async def _wait_connected(ep: Session, need: Any, n: int, timeout: float) -> float:
    """Searches until every instance answers; returns the seconds it took."""
    request = await ep.create_data_request("Connectivity probe", "benchmark", need)
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        _, summary = await ep.search(request.name, timeout=10)
        if summary.matched + summary.not_matched == n:
            return time.perf_counter() - start
        await asyncio.sleep(0.2)
    raise TimeoutError(f"not all {n} instances reachable within {timeout}s")


async def _product_searches(
    address: str, fleet_csv: Path, n: int, searches: int, mp_pid: int
) -> tuple[dict[str, Any], Session]:
    mp_proc = psutil.Process(mp_pid)
    async with MarketplaceClient(address) as mp:
        ep = await mp.sign_up(ROLE_ELIGIBLE_PARTY, "bench-ep@bench.example", PASSWORD, "Bench EP")
        rss_before = mp_proc.memory_info().rss
        t0 = time.perf_counter()
        await _claim_all(mp, fleet_csv, n)
        claim_s = time.perf_counter() - t0
        need = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400)
        connect_s = await _wait_connected(ep, need, n, timeout=300)
        await asyncio.sleep(1.0)
        rss_per_instance = (mp_proc.memory_info().rss - rss_before) / n
        cpu_before = sum(mp_proc.cpu_times()[:2])
        broad = await _timed_searches(ep, "Load profiles for a study", need, n, searches)
        cpu_per_search = (sum(mp_proc.cpu_times()[:2]) - cpu_before) / searches
        # A selective need: only the hydrogen households (about a fifth of the seeded mix) match.
        selective = await _timed_searches(
            ep,
            "Hydrogen pilot households",
            data_need("HYDROGEN", ["7-0:3.0.0"], 3600, 3600, 0, 86400),
            n,
            searches,
        )
        return {
            "n": n,
            "claim_s": claim_s,
            "all_connected_s": connect_s,
            "p50_ms": broad["p50_ms"],
            "p95_ms": broad["p95_ms"],
            "server_elapsed_p50_ms": broad["server_elapsed_p50_ms"],
            "matched": broad["matched"],
            "selective": selective,
            "cpu_ms_per_search": cpu_per_search * 1000,
            "rss_per_instance_kib": rss_per_instance / 1024,
        }, ep


async def _timed_searches(ep: Session, title: str, need: Any, n: int, searches: int) -> dict[str, Any]:
    """p50/p95 of call -> summary over `searches` searches of one data request (after a warm-up)."""
    request = await ep.create_data_request(title, "benchmark", need)
    await ep.search(request.name, timeout=30)
    samples, server_elapsed, matched = [], [], 0
    for _ in range(searches):
        t = time.perf_counter()
        matches, summary = await ep.search(request.name, timeout=30)
        samples.append(time.perf_counter() - t)
        server_elapsed.append(summary.elapsed.ToTimedelta().total_seconds())
        assert summary.queried == n and summary.matched + summary.not_matched == n, summary
        matched = len(matches)
    return {
        "p50_ms": statistics.median(samples) * 1000,
        "p95_ms": _p95(samples) * 1000,
        "server_elapsed_p50_ms": statistics.median(server_elapsed) * 1000,
        "matched": matched,
    }


async def _restart_to_full_reach(
    data_dir: Path, work: Path, n: int, old: procs.Proc
) -> tuple[float, procs.Proc]:
    old.stop()
    t0 = time.perf_counter()
    mp = procs.start_marketplace(
        data_dir, work, "--search-rate", "100000", "--log-level", "warning", name="marketplace-restarted"
    )
    async with MarketplaceClient(mp.address) as client:
        ep = await client.log_in("bench-ep@bench.example", PASSWORD)
        need = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400)
        await _wait_connected(ep, need, n, timeout=300)
    return time.perf_counter() - t0, mp


def product(n: int, searches: int, work: Path) -> dict[str, Any]:
    data_dir = work / f"marketplace-{n}"
    fleet_dir = work / f"fleet-{n}"
    mp = procs.start_marketplace(
        data_dir, work, "--search-rate", "100000", "--claim-rate", "100000", "--log-level", "warning"
    )
    fleet = None
    try:
        fleet = procs.start_aiida(
            mp.address,
            fleet_dir,
            PROFILES,
            work,
            *("--fleet", str(n), "--id-prefix", f"bench{n}", "--log-level", "warning"),
            name="fleet",
            timeout=600,
        )
        fleet_csv = fleet_dir / "fleet.csv"
        deadline = time.monotonic() + 600
        while not fleet_csv.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        result, _ = asyncio.run(_product_searches(mp.address, fleet_csv, n, searches, mp.popen.pid))
        restart_s, mp = asyncio.run(_restart_to_full_reach(data_dir, work, n, mp))
        result["restart_to_full_reach_s"] = restart_s
        return result
    finally:
        if fleet is not None:
            fleet.stop()
        mp.stop()
