"""W5 search benchmark: a marketplace and a fleet of N AIIDAs as separate processes vs the floor."""

from __future__ import annotations

import asyncio
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import psutil

from bench.floor import _p95, cpu_seconds
from bench.scrape import scrape
from eddie.marketplace.v1 import data_request_pb2
from eddie_client import ROLE_CUSTOMER, ROLE_ELIGIBLE_PARTY, MarketplaceClient, Session, data_need, procs
from eddie_client.client import duration

PASSWORD = "benchmark passphrase 2026"
PROFILES = Path(__file__).resolve().parent.parent / "aiida_stub" / "profiles"
# The fleet deals these ten households round robin, so the searches below match fixed shares:
# electricity anywhere 80 %, electricity in Austria 50 %, hydrogen 20 %.
FLEET_MIX = [
    *["vienna-p1"] * 3,
    *["graz-gas"] * 2,
    *["berlin-flat"] * 2,
    "germany-heatpump",
    *["hydrogen-pilot"] * 2,
]
BROAD_80 = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400)
BROAD_50 = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400, regions=["AT"])
SELECTIVE = data_need("HYDROGEN", ["7-0:3.0.0"], 3600, 3600, 0, 86400)
SEARCHES = {"broad_50": (BROAD_50, 0.5), "broad_80": (BROAD_80, 0.8), "selective": (SELECTIVE, 0.2)}


def fleet_profiles() -> tuple[Path, list[str]]:
    """The first profile, and `--profile` flags for the rest of the mix (in order)."""
    paths = [PROFILES / f"{name}.toml" for name in FLEET_MIX]
    return paths[0], [arg for path in paths[1:] for arg in ("--profile", str(path))]


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
                "--server-pid",
                str(server.popen.pid),
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
    address: str, fleet_csv: Path, n: int, searches: int, mp_pid: int, fleet_pid: int
) -> tuple[dict[str, Any], Session]:
    mp_proc = psutil.Process(mp_pid)
    fleet_proc = psutil.Process(fleet_pid)
    async with MarketplaceClient(address) as mp:
        ep = await mp.sign_up(ROLE_ELIGIBLE_PARTY, "bench-ep@bench.example", PASSWORD, "Bench EP")
        rss_before = mp_proc.memory_info().rss
        t0 = time.perf_counter()
        await _claim_all(mp, fleet_csv, n)
        claim_s = time.perf_counter() - t0
        connect_s = await _wait_connected(ep, BROAD_80, n, timeout=300)
        await asyncio.sleep(4.0)  # past the heap freezer's quiet period, as in steady operation
        rss_per_instance = (mp_proc.memory_info().rss - rss_before) / n
        result: dict[str, Any] = {
            "n": n,
            "claim_s": claim_s,
            "claims_per_s": n / claim_s,
            "all_connected_s": connect_s,
            "rss_per_instance_kib": rss_per_instance / 1024,
        }
        for label, (need, share) in SEARCHES.items():
            result[label] = await _timed_searches(ep, label, need, n, searches, mp_proc, fleet_proc)
            expected = round(n * share)
            assert result[label]["matched"] == expected, (label, result[label]["matched"], expected)
        return result, ep


async def _counted_search(ep: Session, name: str) -> tuple[int, int, data_request_pb2.SearchSummary]:
    """One search; returns the matched ids, the `matches` messages it took, and the summary."""
    request = data_request_pb2.SearchInstancesRequest(data_request=name, timeout=duration(30))
    ids: set[str] = set()
    messages = 0
    summary = data_request_pb2.SearchSummary()
    async for response in ep.data_requests.SearchInstances(request, metadata=ep.metadata):
        if response.HasField("matches"):
            messages += bool(response.matches.instance_ids)  # progress-only messages carry no ids
            ids.update(response.matches.instance_ids)
        else:
            summary = response.summary
    assert len(ids) == summary.matched, "an id streamed twice or missing"
    return len(ids), messages, summary


async def _timed_searches(
    ep: Session,
    title: str,
    need: Any,
    n: int,
    searches: int,
    mp_proc: psutil.Process,
    fleet_proc: psutil.Process,
) -> dict[str, Any]:
    """p50/p95 of call -> summary over `searches` searches of one data request (after a warm-up),
    the marketplace's CPU per instance per search, and the `matches` messages per search."""
    request = await ep.create_data_request(title, "benchmark", need)
    await _counted_search(ep, request.name)
    samples, server_elapsed, messages, matched = [], [], [], 0
    cpu_before = cpu_seconds(mp_proc)
    fleet_before = cpu_seconds(fleet_proc)
    for _ in range(searches):
        t = time.perf_counter()
        matched, sent, summary = await _counted_search(ep, request.name)
        samples.append(time.perf_counter() - t)
        server_elapsed.append(summary.elapsed.ToTimedelta().total_seconds())
        messages.append(sent)
        assert summary.queried == n and summary.matched + summary.not_matched == n, summary
    cpu = (cpu_seconds(mp_proc) - cpu_before) / searches
    fleet_cpu = (cpu_seconds(fleet_proc) - fleet_before) / searches
    return {
        "p50_ms": statistics.median(samples) * 1000,
        "p95_ms": _p95(samples) * 1000,
        "server_elapsed_p50_ms": statistics.median(server_elapsed) * 1000,
        "matched": matched,
        "messages_p50": statistics.median(messages),
        "cpu_ms_per_search": cpu * 1000,
        "cpu_us_per_instance": cpu / n * 1e6,
        "fleet_cpu_us_per_instance": fleet_cpu / n * 1e6,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _connected_gauge(port: int) -> float:
    """The restarted marketplace's `marketplace_connected_instances` (-1 while /metrics is not up)."""
    try:
        values = await asyncio.to_thread(scrape, f"127.0.0.1:{port}", 2.0)
    except OSError:
        return -1.0
    return values.get("marketplace_connected_instances", -1.0)


async def _restart_to_full_reach(
    data_dir: Path, work: Path, n: int, old: procs.Proc, fleet: psutil.Process
) -> tuple[dict[str, float], procs.Proc, int]:
    """Seconds from starting a new marketplace until a search started then reaches all n, and to
    its `listening` line (the process start-up: imports, migrations, loading the instances), with
    the CPU seconds the marketplace and the fleet spent in that time; and the marketplace's RSS 4 s
    after all n streams were up (before that search).

    Probing by searching every 0.2 s would itself cost the restarting marketplace most of its
    CPU (each probe is a search over every stream already up), so the bench watches the cheap
    connected-instances gauge on /metrics and then proves the reach with a search: the figure is
    the moment that search started. If it falls short, it searches again until one reaches all.
    """
    old.stop()
    port = _free_port()
    t0 = time.perf_counter()
    fleet_cpu0 = cpu_seconds(fleet)
    mp = procs.start_marketplace(
        data_dir,
        work,
        *("--search-rate", "100000", "--log-level", "warning", "--metrics-listen", f"127.0.0.1:{port}"),
        name="marketplace-restarted",
    )
    listening = time.perf_counter() - t0
    reached_rss = 0  # the restarted process's RSS once every stream is up, before the search
    async with MarketplaceClient(mp.address) as client:
        probe: tuple[Session, str] | None = None
        while time.perf_counter() - t0 < 300:
            if await _connected_gauge(port) < n:
                await asyncio.sleep(0.05)
                continue
            started = time.perf_counter() - t0
            figures = {
                "restart_to_full_reach_s": started,
                "restart_to_listening_s": listening,
                "restart_cpu_s": cpu_seconds(psutil.Process(mp.popen.pid)),
                "restart_fleet_cpu_s": cpu_seconds(fleet) - fleet_cpu0,
            }
            if not reached_rss:
                # Measured before the bench signs in: a password check (argon2) leaves tens of MiB
                # in the heap that are not the streams'.
                await asyncio.sleep(4.0)  # past the heap freezer's quiet period, as in steady operation
                reached_rss = psutil.Process(mp.popen.pid).memory_info().rss
            if probe is None:
                ep = await client.log_in("bench-ep@bench.example", PASSWORD)
                request = await ep.create_data_request("Connectivity probe", "benchmark", BROAD_80)
                probe = ep, request.name
            _, summary = await probe[0].search(probe[1], timeout=10)
            if summary.matched + summary.not_matched == n:
                return figures, mp, reached_rss
        raise TimeoutError(f"not all {n} instances reachable within 300 s of the restart")


def product(n: int, searches: int, work: Path) -> dict[str, Any]:
    data_dir = work / f"marketplace-{n}"
    fleet_dir = work / f"fleet-{n}"
    mp = procs.start_marketplace(
        data_dir, work, "--search-rate", "100000", "--claim-rate", "100000", "--log-level", "warning"
    )
    rss_empty = psutil.Process(mp.popen.pid).memory_info().rss  # no instance registered yet
    fleet = None
    try:
        first_profile, more_profiles = fleet_profiles()
        fleet = procs.start_aiida(
            mp.address,
            fleet_dir,
            first_profile,
            work,
            *("--fleet", str(n), "--id-prefix", f"bench{n}", "--log-level", "warning"),
            *more_profiles,
            name="fleet",
            timeout=600,
        )
        fleet_csv = fleet_dir / "fleet.csv"
        deadline = time.monotonic() + 600
        while not fleet_csv.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        result, _ = asyncio.run(
            _product_searches(mp.address, fleet_csv, n, searches, mp.popen.pid, fleet.popen.pid)
        )
        restart, mp, reached_rss = asyncio.run(
            _restart_to_full_reach(data_dir, work, n, mp, psutil.Process(fleet.popen.pid))
        )
        result.update(restart)
        # The streams' own memory: a restarted process with all N streams up (before its first
        # search) holds the streams but not what registering and claiming N instances left in the
        # first process's heap (requests, sessions, free lists); the base is that first process
        # right after its start, before any instance registered.
        result["rss_per_instance_restarted_kib"] = (reached_rss - rss_empty) / n / 1024
        return result
    finally:
        if fleet is not None:
            fleet.stop()
        mp.stop()
