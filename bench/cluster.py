"""Cluster figures (`make bench BENCH_ARGS=--cluster`, issue 14.7): replicas on PostgreSQL and NATS.

For each size N, on a fresh PostgreSQL database and a NATS subject prefix of its own:

1. one replica, N AIIDAs in FLEET_SHARE-sized fleet processes (bench/search.py's FLEET_MIX), every instance
   claimed; then a second and a third replica join. At 1, 2 and 3 replicas: an idle window
   (what the leases, heartbeats and resyncs cost), then timed searches (50 % matching) through
   replica 1: p50 / p95, the CPU of all replicas per instance per search, and per search the
   NATS messages and payload bytes (the replicas' nats-py client counters, read from their
   `--metrics-listen`), the SQL statements the replicas sent (their statement counters) and the
   database's `pg_stat_database` deltas (transactions, rows), each net of the idle rate;
2. kill -9 -> full reach: SIGKILL replica 3 while searching every 0.5 s through replica 1;
   the time until a search is exact again (queried = claimed = matched + not matched, nothing
   unreachable or timed out), and that every summary kept queried = claimed with no id twice.

The NATS server's own monitoring port is not assumed (this machine runs it without one); the
client counters count each message once where it is published (out) and once per receiver (in).
Environment: BENCH_DATABASE_URL (an existing database to connect to for CREATE DATABASE,
default the local `test`), BENCH_NATS_URL (default nats://127.0.0.1:4222).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import psutil
from sqlalchemy.engine import make_url

from bench.floor import _p95, cpu_seconds
from bench.scrape import scrape
from bench.search import BROAD_50, BROAD_80, PASSWORD, _claim_all, _wait_connected, fleet_profiles
from eddie.marketplace.v1 import data_request_pb2
from eddie_client import ROLE_ELIGIBLE_PARTY, MarketplaceClient, Session, procs
from eddie_client.client import duration
from eddie_common.metrics import REFRESH_MIN_INTERVAL

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")
LOGS = Path(__file__).resolve().parent / "results" / "logs"
BUCKETS = 256  # marketplace_server.cluster.leases.BUCKETS
SEARCH_TIMEOUT = 30.0
KILL_SEARCH_TIMEOUT = 3.0
KILL_INTERVAL = 0.5
KILL_IN_FLIGHT = 2
KILL_EXACT_RUN = 6  # consecutive exact searches (3 s) that end the kill phase
KILL_DEADLINE = 90.0
# AIIDAs per fleet process. Real AIIDAs are separate devices; one simulator process holding 10,000
# of them is one event loop, and grpc.aio's server takes one new call per turn of its loop (its
# accept loop keeps a single request outstanding). Under search load a turn handles thousands of
# queries, so a single fleet admitted a few new streams per second and a kill -9 took 50 s to heal
# for the simulator's sake (bench/README figures); 1,250 per process keeps each loop's turns short.
FLEET_SHARE = 1_250
# A backend reports to pg_stat_database at most once a second, and an idle one within 10 s.
PG_FLUSH_SECONDS = 11.0
PG_FIELDS = (
    "xact_commit",
    "xact_rollback",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
)
STATEMENTS = "marketplace_db_statements_total"
LEASE_TABLES = ("bucket_leases", "replicas")
# What a search reads and writes: the caller (token check), the data request, the snapshot of the
# leases and the claimed counts per bucket (one statement, named by `bucket_leases`, which it
# joins to `bucket_claims`), the stored search and its match set. `instances` stays listed: the
# search no longer reads it, and a statement there would show a regression.
SEARCH_TABLES = (
    "accounts",
    "data_requests",
    "bucket_leases",
    "bucket_claims",
    "instances",
    "searches",
    "search_match_chunks",
)
NATS_KEYS = {
    "nats_in_msgs": 'marketplace_nats_messages_total{direction="in"}',
    "nats_out_msgs": 'marketplace_nats_messages_total{direction="out"}',
    "nats_in_bytes": 'marketplace_nats_bytes_total{direction="in"}',
    "nats_out_bytes": 'marketplace_nats_bytes_total{direction="out"}',
}


# --- pure helpers (tests/test_bench_cluster.py) ---


def family_sum(values: dict[str, float], name: str) -> float:
    """The sum of one family's samples over all its labels."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def label_sums(values: dict[str, float], name: str, label: str) -> dict[str, float]:
    """One family's samples summed by the value of one label, e.g. statements by table."""
    sums: dict[str, float] = {}
    pattern = re.compile(rf'(?:^|,){re.escape(label)}="([^"]*)"')
    for key, value in values.items():
        if key.startswith(name + "{"):
            match = pattern.search(key[len(name) + 1 : -1])
            if match:
                sums[match.group(1)] = sums.get(match.group(1), 0.0) + value
    return sums


def _minus(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in sorted(set(a) | set(b))}


def is_exact(summary: dict[str, int], claimed: int) -> bool:
    """Every claimed instance answered: nothing unreachable or timed out, queried = claimed."""
    return (
        summary["queried"] == claimed
        and summary["unreachable"] == 0
        and summary["timed_out"] == 0
        and summary["matched"] + summary["not_matched"] == claimed
    )


def consistent(summary: dict[str, int], claimed: int) -> bool:
    """queried = claimed = matched + not matched + unreachable + timed out."""
    parts = ("matched", "not_matched", "unreachable", "timed_out")
    return summary["queried"] == claimed == sum(summary[p] for p in parts)


def time_to_exact(samples: Iterable[tuple[float, float, bool]]) -> tuple[float, float] | None:
    """(started, answered) seconds of the first exact search from which on every search started
    later was exact too; `samples` are (started, answered, exact) relative to the kill."""
    result: tuple[float, float] | None = None
    for started, answered, exact in sorted(samples):
        if not exact:
            result = None
        elif result is None:
            result = (started, answered)
    return result


WATCHED_EVENTS = ("leases_self_fenced", "leases_renew_failed", "nats_error", "cluster_resync_failed")


def log_warnings(logs: Path) -> dict[str, dict[str, int]]:
    """How often each replica logged one of the events that cost reach (self-fencing, ...)."""
    counts: dict[str, dict[str, int]] = {}
    for path in sorted(logs.glob("replica-*.log")):
        text = path.read_text(errors="replace")
        found = {event: text.count(event) for event in WATCHED_EVENTS if event in text}
        if found:
            counts[path.stem] = found
    return counts


def net_per_search(delta: float, idle_per_s: float, seconds: float, searches: int) -> float:
    """A counter's growth during `searches` searches, less what it grows by at idle in that time."""
    return (delta - idle_per_s * seconds) / searches


# --- the running cluster ---


def unavailable_reason() -> str | None:
    """Why the cluster section cannot run here, or None."""
    db = make_url(DATABASE_URL)
    nats = urlsplit(NATS_URL)
    for what, host, port in (
        ("PostgreSQL", db.host or "127.0.0.1", db.port or 5432),
        ("NATS", nats.hostname or "127.0.0.1", nats.port or 4222),
    ):
        try:
            with socket.create_connection((host, port), timeout=1):
                pass
        except OSError as exc:
            return f"{what} at {host}:{port} is unreachable ({exc.strerror or exc})"
    return None


def _admin_dsn() -> str:
    return make_url(DATABASE_URL).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Replica:
    index: int
    proc: procs.Proc
    metrics: str
    ps: psutil.Process

    @property
    def replica_id(self) -> str:
        return f"replica-{self.index}"

    def scrape(self) -> dict[str, float]:
        values = scrape(self.metrics)
        values["cpu_s"] = cpu_seconds(self.ps)
        return values


@dataclass
class Snapshot:
    at: float
    replicas: dict[int, dict[str, float]]
    pg: dict[str, float]
    fleet_cpu_s: float


@dataclass
class Cluster:
    n: int
    work: Path
    database: str
    prefix: str
    replicas: list[Replica] = field(default_factory=list)
    fleets: list[procs.Proc] = field(default_factory=list)
    logs: Path = field(init=False)
    # Statements by table that one scrape itself sends, per replica.
    scrape_cost: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The replicas' and the fleet's stderr (warnings: self-fencing, failed renewals) outlive the run.
        self.logs = LOGS / f"cluster-{self.n}"

    @property
    def database_url(self) -> str:
        return make_url(DATABASE_URL).set(database=self.database).render_as_string(hide_password=False)

    def add_replica(self) -> Replica:
        index = len(self.replicas) + 1
        proc = procs.start_marketplace(
            self.work / "keys",
            self.logs,
            *("--database-url", self.database_url, "--nats-url", NATS_URL),
            *("--cluster-name", self.prefix, "--replica-id", f"replica-{index}"),
            *("--metrics-listen", "127.0.0.1:0", "--log-level", "warning"),
            *("--search-rate", "100000", "--claim-rate", "100000"),
            name=f"replica-{index}",
        )
        metrics = next(line.split()[-1] for line in proc.lines if line.startswith("metrics on "))
        replica = Replica(index, proc, metrics, psutil.Process(proc.popen.pid))
        self.replicas.append(replica)
        return replica

    @property
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.proc.popen.poll() is None]

    async def pg_stats(self) -> dict[str, float]:
        connection = await asyncpg.connect(_admin_dsn(), timeout=5)  # not the bench database
        try:
            await connection.execute("SELECT pg_stat_clear_snapshot()")
            row = await connection.fetchrow(
                f"SELECT {', '.join(PG_FIELDS)} FROM pg_stat_database WHERE datname = $1", self.database
            )
        finally:
            await connection.close()
        return {k: float(row[k]) for k in PG_FIELDS}

    async def snapshot(self) -> Snapshot:
        await asyncio.sleep(PG_FLUSH_SECONDS)  # what the replicas did so far reaches pg_stat_database
        at = time.perf_counter()
        replicas = {}
        for r in self.live:
            replicas[r.index] = await asyncio.to_thread(r.scrape)
        pg = await self.pg_stats()
        fleet = sum(cpu_seconds(psutil.Process(f.popen.pid)) for f in self.fleets)
        return Snapshot(at, replicas, pg, fleet)

    async def calibrate_scrape(self) -> None:
        """A scrape refreshes two gauges from the database: its statements are not the cluster's."""
        for r in self.live:
            first = await asyncio.to_thread(r.scrape)
            await asyncio.sleep(REFRESH_MIN_INTERVAL)  # closer scrapes reuse the last refresh
            second = await asyncio.to_thread(r.scrape)
            self.scrape_cost[r.replica_id] = _minus(
                label_sums(second, STATEMENTS, "table"), label_sums(first, STATEMENTS, "table")
            )

    def deltas(self, before: Snapshot, after: Snapshot) -> dict[str, Any]:
        """Per replica and summed: statements (less the closing scrape's own), NATS, CPU; pg_stat."""
        per_replica: dict[str, dict[str, Any]] = {}
        for index, end in after.replicas.items():
            start = before.replicas.get(index)
            if start is None:
                continue
            name = f"replica-{index}"
            tables = _minus(label_sums(end, STATEMENTS, "table"), label_sums(start, STATEMENTS, "table"))
            tables = _minus(tables, self.scrape_cost.get(name, {}))
            d: dict[str, Any] = {
                "statements": sum(tables.values()),
                "statements_by_table": tables,
                "cpu_s": end["cpu_s"] - start["cpu_s"],
            }
            for key, metric in NATS_KEYS.items():
                d[key] = end.get(metric, 0.0) - start.get(metric, 0.0)
            per_replica[name] = d
        total: dict[str, Any] = {
            k: sum(d[k] for d in per_replica.values()) for k in ("statements", "cpu_s", *NATS_KEYS)
        }
        by_table: dict[str, float] = {}
        for d in per_replica.values():
            for table, count in d["statements_by_table"].items():
                by_table[table] = by_table.get(table, 0.0) + count
        total["statements_by_table"] = by_table
        pg = {k: after.pg[k] - before.pg[k] for k in PG_FIELDS}
        return {
            "seconds": after.at - before.at,
            "replicas": per_replica,
            "total": total,
            "pg": pg,
            "fleet_cpu_s": after.fleet_cpu_s - before.fleet_cpu_s,
        }

    async def ownership(self) -> dict[str, int]:
        """Live lease owners and how many buckets each holds ('' for free or expired ones)."""
        connection = await asyncpg.connect(make_url(self.database_url).set(drivername="postgresql")
                                           .render_as_string(hide_password=False), timeout=5)  # fmt: skip
        try:
            rows = await connection.fetch(
                "SELECT CASE WHEN expires_at > now() THEN coalesce(owner, '') ELSE '' END AS o, count(*)"
                " FROM bucket_leases GROUP BY 1"
            )
        finally:
            await connection.close()
        return {str(row[0]): int(row[1]) for row in rows}

    async def wait_balanced(self, timeout: float = 120.0) -> float:
        """Until every live replica holds its share and no bucket is free; returns the seconds."""
        want = {r.replica_id for r in self.live}
        share = -(-BUCKETS // len(want))
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            owners = await self.ownership()
            if (
                set(owners) == want
                and sum(owners.values()) == BUCKETS
                and min(owners.values()) >= BUCKETS - share * (len(want) - 1)
            ):
                return time.perf_counter() - start
            await asyncio.sleep(0.5)
        raise TimeoutError(f"buckets not balanced over {sorted(want)} within {timeout}s: {owners}")

    def stop(self) -> None:
        for fleet in self.fleets:
            fleet.stop()
        self.fleets = []
        for r in reversed(self.replicas):
            r.proc.stop(timeout=30)


async def _search(ep: Session, name: str, timeout: float) -> tuple[dict[str, int], bool]:
    """One search: its summary as a dict, and whether every id came once and the count agrees."""
    request = data_request_pb2.SearchInstancesRequest(data_request=name, timeout=duration(timeout))
    ids: list[str] = []
    summary = data_request_pb2.SearchSummary()
    async for response in ep.data_requests.SearchInstances(request, metadata=ep.metadata):
        if response.HasField("matches"):
            ids.extend(response.matches.instance_ids)
        else:
            summary = response.summary
    counts = {
        k: int(getattr(summary, k)) for k in ("queried", "matched", "not_matched", "unreachable", "timed_out")
    }
    return counts, len(ids) == len(set(ids)) == summary.matched


async def _wait_exact(ep: Session, name: str, n: int, timeout: float = 120.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        summary, _ = await _search(ep, name, 10.0)
        if is_exact(summary, n):
            return time.perf_counter() - start
        await asyncio.sleep(0.25)
    raise TimeoutError(f"searches not exact within {timeout}s")


async def _measure(cluster: Cluster, ep: Session, name: str, searches: int, idle: float) -> dict[str, Any]:
    count = len(cluster.live)
    await cluster.calibrate_scrape()
    before = await cluster.snapshot()
    await asyncio.sleep(idle)
    after = await cluster.snapshot()
    idle_d = cluster.deltas(before, after)
    idle_s = idle_d["seconds"]
    await _search(ep, name, SEARCH_TIMEOUT)  # warm-up
    before = await cluster.snapshot()
    samples: list[float] = []
    inexact: list[dict[str, int]] = []  # reach lost under load: recorded and printed, the run goes on
    broken: list[dict[str, int]] = []  # queried != claimed, an id twice, a wrong match set: a bug
    for _ in range(searches):
        t = time.perf_counter()
        summary, once = await _search(ep, name, SEARCH_TIMEOUT)
        samples.append(time.perf_counter() - t)
        if not (once and consistent(summary, cluster.n)):
            broken.append(summary)
        elif not is_exact(summary, cluster.n):
            inexact.append(summary)
        elif summary["matched"] != cluster.n // 2:
            broken.append(summary)
    after = await cluster.snapshot()
    d = cluster.deltas(before, after)
    seconds = d["seconds"]

    def net(delta: float, idle_delta: float) -> float:
        return net_per_search(delta, idle_delta / idle_s, seconds, searches)

    tables, idle_tables = d["total"]["statements_by_table"], idle_d["total"]["statements_by_table"]
    per_search: dict[str, Any] = {
        # The search's own statements (the background loops slow down while searches run, so
        # subtracting their idle rate from the total would undercount the search).
        "statements": sum(net(tables.get(t, 0.0), idle_tables.get(t, 0.0)) for t in SEARCH_TABLES),
        "statements_by_table": {
            t: round(net(tables.get(t, 0.0), idle_tables.get(t, 0.0)), 2)
            for t in sorted(set(tables) | set(idle_tables))
        },
        **{k: net(d["total"][k], idle_d["total"][k]) for k in NATS_KEYS},
        **{f"pg_{k}": net(d["pg"][k], idle_d["pg"][k]) for k in PG_FIELDS},
    }
    cpu = d["total"]["cpu_s"] / searches
    return {
        "replicas": count,
        "p50_ms": statistics.median(samples) * 1000,
        "p95_ms": _p95(samples) * 1000,
        "searches": searches,
        "inexact_searches": len(inexact),
        "inexact_examples": inexact[:3],
        "broken_searches": len(broken),
        "broken_examples": broken[:3],
        "cpu_ms_per_search": cpu * 1000,
        "cpu_us_per_instance": cpu / cluster.n * 1e6,
        "cpu_ms_per_search_by_replica": {k: v["cpu_s"] / searches * 1000 for k, v in d["replicas"].items()},
        "fleet_cpu_us_per_instance": d["fleet_cpu_s"] / searches / cluster.n * 1e6,
        "per_search": per_search,
        "idle": {
            "seconds": idle_s,
            "statements_per_s_by_replica": {
                k: v["statements"] / idle_s for k, v in idle_d["replicas"].items()
            },
            "cpu_percent_by_replica": {k: v["cpu_s"] / idle_s * 100 for k, v in idle_d["replicas"].items()},
            # Per replica (the mean over the replicas), by table: bucket_leases + replicas are the leases.
            "statements_per_s_per_replica_by_table": {
                t: round(c / idle_s / count, 3) for t, c in sorted(idle_tables.items())
            },
            "lease_statements_per_s_per_replica": sum(idle_tables.get(t, 0.0) for t in LEASE_TABLES)
            / idle_s
            / count,
            "nats_msgs_per_s": (idle_d["total"]["nats_in_msgs"] + idle_d["total"]["nats_out_msgs"]) / idle_s,
            **{f"pg_{k}_per_s": idle_d["pg"][k] / idle_s for k in PG_FIELDS},
        },
    }


async def _kill_phase(cluster: Cluster, ep: Session, name: str, timeout: float) -> dict[str, Any]:
    """SIGKILL replica 3 while searching every 0.5 s through replica 1 (at most KILL_IN_FLIGHT at
    once: a 2-core machine cannot run a search over 10,000 instances every 0.5 s on top)."""
    victim = cluster.replicas[2]
    loop = asyncio.get_running_loop()
    killed_at: list[float] = []
    samples: list[tuple[float, float, bool]] = []
    timeline: list[dict[str, Any]] = []
    inconsistent: list[dict[str, int]] = []
    errors: list[str] = []
    running: set[asyncio.Task[None]] = set()

    async def one() -> None:
        started = loop.time()
        entry: dict[str, Any] = {}
        try:
            summary, once = await _search(ep, name, timeout)
            entry.update(summary)
        except grpc.aio.AioRpcError as exc:  # a failed search is not exact
            errors.append(f"{exc.code().name}: {exc.details()} {exc.debug_error_string()}"[:400])
            entry["error"] = exc.code().name
            summary, once = None, True
        answered = loop.time()
        if summary is not None and not (once and consistent(summary, cluster.n)):
            inconsistent.append(summary)
        zero = killed_at[0] if killed_at else started
        entry.update(started_s=round(started - zero, 2), answered_s=round(answered - zero, 2))
        timeline.append(entry)
        if killed_at:
            exact = summary is not None and once and is_exact(summary, cluster.n)
            samples.append((started - killed_at[0], answered - killed_at[0], exact))

    start = loop.time()
    launched = 0
    while loop.time() - start < KILL_DEADLINE:
        if not killed_at and loop.time() - start >= 2.0:
            victim.proc.popen.send_signal(signal.SIGKILL)
            killed_at.append(loop.time())
        if len(running) < KILL_IN_FLIGHT:
            task = asyncio.create_task(one())
            running.add(task)
            task.add_done_callback(running.discard)
            launched += 1
        done = sorted(s for s in samples if s[0] >= 0)
        if len(done) >= KILL_EXACT_RUN and all(s[2] for s in done[-KILL_EXACT_RUN:]):
            break
        await asyncio.sleep(KILL_INTERVAL)
    await asyncio.gather(*running)
    victim.proc.popen.wait()
    reach = time_to_exact(samples)
    return {
        "killed": victim.replica_id,
        "search_timeout_s": timeout,
        "searches": launched,
        "exact_again_started_s": reach[0] if reach else None,
        "exact_again_answered_s": reach[1] if reach else None,
        "inconsistent_summaries": len(inconsistent),
        "inconsistent_examples": inconsistent[:3],
        "failed_searches": len(errors),
        "failed_examples": errors[:3],
        "timeline": sorted(timeline, key=lambda e: e["started_s"]),
    }


async def _run_size(n: int, searches: int, idle: float, work: Path) -> dict[str, Any]:
    tag = secrets.token_hex(4)
    cluster = Cluster(n, work / f"cluster-{n}", f"eddie_bench_{tag}", f"eddie-bench-{tag}")
    cluster.work.mkdir(parents=True)
    shutil.rmtree(cluster.logs, ignore_errors=True)
    cluster.logs.mkdir(parents=True)
    admin = await asyncpg.connect(_admin_dsn(), timeout=5)
    try:
        await admin.execute(f"CREATE DATABASE {cluster.database}")
    finally:
        await admin.close()
    try:
        await asyncio.to_thread(cluster.add_replica)
        first_profile, more_profiles = fleet_profiles()
        shares = [min(FLEET_SHARE, n - start) for start in range(0, n, FLEET_SHARE)]
        for index, share in enumerate(shares):
            cluster.fleets.append(
                await asyncio.to_thread(
                    procs.start_aiida,
                    cluster.replicas[0].proc.address,
                    cluster.work / f"fleet-{index}",
                    first_profile,
                    cluster.logs,
                    *("--fleet", str(share), "--id-prefix", f"cb{n}f{index}", "--log-level", "warning"),
                    *more_profiles,
                    name=f"fleet-{index}",
                    timeout=600,
                )
            )
        csvs = [cluster.work / f"fleet-{index}" / "fleet.csv" for index in range(len(shares))]
        deadline = time.monotonic() + 600
        while not all(c.exists() for c in csvs) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        result: dict[str, Any] = {
            "n": n,
            "fleet_processes": len(shares),
            "database": cluster.database,
            "nats_prefix": cluster.prefix,
        }
        async with MarketplaceClient(cluster.replicas[0].proc.address) as mp:
            ep = await mp.sign_up(ROLE_ELIGIBLE_PARTY, "bench-ep@bench.example", PASSWORD, "Bench EP")
            t0 = time.perf_counter()
            for fleet_csv, share in zip(csvs, shares, strict=True):
                await _claim_all(mp, fleet_csv, share)
            result["claims_per_s"] = n / (time.perf_counter() - t0)
            result["all_connected_s"] = await _wait_connected(ep, BROAD_80, n, timeout=300)
            request = await ep.create_data_request("Cluster benchmark", "benchmark", BROAD_50)
            rows = []
            for count in (1, 2, 3):
                joined: dict[str, float] = {}
                if count > 1:
                    print(f"N={n:,}: replica {count} joins ...", flush=True)
                    t = time.perf_counter()
                    await asyncio.to_thread(cluster.add_replica)
                    await cluster.wait_balanced()
                    joined["join_to_balanced_s"] = time.perf_counter() - t
                    await _wait_exact(ep, request.name, n)
                    joined["join_to_exact_s"] = time.perf_counter() - t
                print(
                    f"N={n:,}, {count} replica(s): idle {idle:.0f} s, then {searches} searches ...",
                    flush=True,
                )
                rows.append({**await _measure(cluster, ep, request.name, searches, idle), **joined})
            result["by_replicas"] = rows
            print(f"N={n:,}: kill -9 replica-3, searching every {KILL_INTERVAL} s ...", flush=True)
            # Long enough for a search on this machine, so that only lost reach makes one inexact.
            timeout = max(KILL_SEARCH_TIMEOUT, 3 * rows[-1]["p95_ms"] / 1000)
            result["kill"] = await _kill_phase(cluster, ep, request.name, timeout)
        await asyncio.to_thread(cluster.stop)
        result["warnings"] = log_warnings(cluster.logs)
        return result
    finally:
        await asyncio.to_thread(cluster.stop)
        admin = await asyncpg.connect(_admin_dsn(), timeout=5)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {cluster.database} WITH (FORCE)")
        finally:
            await admin.close()


def run(sizes: list[int], searches: int, idle: float, work: Path) -> dict[str, Any]:
    results = []
    for n in sizes:
        results.append(asyncio.run(_run_size(n, searches, idle, work)))
    return {"sizes": results, "buckets": BUCKETS, "nats_url": NATS_URL}


def _row(label: str, *cells: str) -> str:
    return f"{label:<44}" + "".join(f"{c:>16}" for c in cells)


def _mean(values: dict[str, float]) -> float:
    return statistics.mean(values.values()) if values else 0.0


def _joined(r: dict[str, Any]) -> str:
    if "join_to_exact_s" not in r:
        return "-"
    return f"{r['join_to_balanced_s']:.1f} / {r['join_to_exact_s']:.1f}"


# (label, cell of one row of `by_replicas`); `p` is the row's per_search, `i` its idle window.
FIGURES: list[tuple[str, Any]] = [
    ("p50 / p95 ms (through replica 1)", lambda r, p, i: f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f}"),
    ("marketplace CPU us per instance (all)", lambda r, p, i: f"{r['cpu_us_per_instance']:.0f}"),
    ("fleet CPU us per instance", lambda r, p, i: f"{r['fleet_cpu_us_per_instance']:.0f}"),
    ("NATS msgs per search out / in", lambda r, p, i: f"{p['nats_out_msgs']:.0f} / {p['nats_in_msgs']:.0f}"),
    (
        "NATS KiB per search out / in",
        lambda r, p, i: f"{p['nats_out_bytes'] / 1024:.0f} / {p['nats_in_bytes'] / 1024:.0f}",
    ),
    ("SQL statements per search (search path)", lambda r, p, i: f"{p['statements']:.1f}"),
    ("PG transactions per search", lambda r, p, i: f"{p['pg_xact_commit'] + p['pg_xact_rollback']:.1f}"),
    ("PG rows read per search (returned)", lambda r, p, i: f"{p['pg_tup_returned']:.0f}"),
    ("PG rows inserted per search", lambda r, p, i: f"{p['pg_tup_inserted']:.0f}"),
    ("idle SQL statements/s per replica", lambda r, p, i: f"{_mean(i['statements_per_s_by_replica']):.2f}"),
    ("  of which leases (+ heartbeat)", lambda r, p, i: f"{i['lease_statements_per_s_per_replica']:.2f}"),
    (
        "idle PG transactions/s (all)",
        lambda r, p, i: f"{i['pg_xact_commit_per_s'] + i['pg_xact_rollback_per_s']:.2f}",
    ),
    ("idle PG rows read/s (all)", lambda r, p, i: f"{i['pg_tup_returned_per_s']:.0f}"),
    ("idle CPU % per replica", lambda r, p, i: f"{_mean(i['cpu_percent_by_replica']):.1f}"),
    ("join -> buckets balanced / exact s", lambda r, p, i: _joined(r)),
    (
        "timed searches not exact / broken",
        lambda r, p, i: f"{r['inexact_searches']} / {r['broken_searches']} of {r['searches']}",
    ),
]


def print_figures(report: dict[str, Any]) -> None:
    for size in report["sizes"]:
        n, rows = size["n"], size["by_replicas"]
        print()
        fleets = size.get("fleet_processes", 1)
        print(
            _row(
                f"cluster search 50 %, N={n:,} ({fleets} fleet processes)",
                *(f"{r['replicas']} replica(s)" for r in rows),
            )
        )
        for label, cell in FIGURES:
            print(_row(label, *(cell(r, r["per_search"], r["idle"]) for r in rows)))
        k = size["kill"]
        started, answered = k["exact_again_started_s"], k["exact_again_answered_s"]
        reach = f"{started:.1f} s (answered at {answered:.1f} s)" if started is not None else "never"
        print(
            f"kill -9 {k['killed']} -> searches exact again: {reach}; {k['searches']} searches "
            f"(timeout {k['search_timeout_s']:.1f} s, at most {KILL_IN_FLIGHT} at once), "
            f"{k['inconsistent_summaries']} with queried != claimed or an id twice, "
            f"{k['failed_searches']} failed"
        )
        if size.get("warnings"):
            print(f"replica warnings (logs in {LOGS}): {size['warnings']}")
