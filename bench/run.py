"""`make bench`: the search fan-out against the bare grpc.aio floor, and W6 latencies.

Prints a table and writes bench/results/bench.json. Usage:
    python -m bench.run [--sizes 1000,10000] [--searches K] [--skip-access] [--sink-churn]
                        [--cluster [--cluster-sizes 10000] [--cluster-searches 15] [--cluster-idle 30]]

`--sink-churn` adds the sink-under-churn soak (bench/sink_churn.py, issue 15.7);
`--sizes '' --skip-access --sink-churn` runs only that. `--cluster` adds the cluster figures
(bench/cluster.py, issue 14.7: 1, 2 and 3 replicas on the local PostgreSQL and NATS, then
kill -9 -> full reach); `--sizes '' --skip-access --cluster` runs only those.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import search

RESULTS = Path(__file__).resolve().parent / "results"
# Timed searches per size and kind by default: SAMPLES_PER_SIZE / N, at least 7 (25 at 1,000, 7 at 10,000).
SAMPLES_PER_SIZE = 25_000
SEARCH_LABELS = {
    "broad_50": "broad search 50 %",
    "broad_80": "broad search 80 %",
    "selective": "selective 20 %",
}


def bracketing_floor(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The floor measured before and after the marketplace, each figure the mean of the two.

    This machine's speed drifts by 10-30 % within an hour (the floor at 1,000 moved from 57 to
    69 ms in one afternoon), and the marketplace's figures take minutes to gather: a floor taken
    only before them compares the marketplace with another moment's machine. Both runs are kept.
    """
    keys = (
        "p50_ms",
        "p95_ms",
        "cpu_us_per_instance",
        "rss_per_stream_kib",
        "open_s",
        "open_cpu_s",
        "open_server_cpu_s",
    )
    return {
        "n": before["n"],
        **{key: (before[key] + after[key]) / 2 for key in keys},
        "before": before,
        "after": after,
    }


def _row(label: str, *cells: str) -> str:
    return f"{label:<44}" + "".join(f"{c:>16}" for c in cells)


def print_search_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(_row("W5 search (call -> summary)", *(f"N={r['n']:,}" for r in rows)))
    print(
        _row(
            "floor p50 / p95 ms", *(f"{r['floor']['p50_ms']:.0f} / {r['floor']['p95_ms']:.0f}" for r in rows)
        )
    )
    print(
        _row(
            "  floor p50 before / after the marketplace",
            *(f"{r['floor']['before']['p50_ms']:.0f} / {r['floor']['after']['p50_ms']:.0f}" for r in rows),
        )
    )
    for key, label in SEARCH_LABELS.items():
        print(
            _row(
                f"{label} p50 / p95 ms",
                *(f"{r['search'][key]['p50_ms']:.0f} / {r['search'][key]['p95_ms']:.0f}" for r in rows),
            )
        )
        print(_row("  ratio to the floor (p50)", *(f"{r['ratios'][key]:.2f}" for r in rows)))
        print(
            _row(
                "  matched / `matches` messages per search",
                *(f"{r['search'][key]['matched']:,} / {r['search'][key]['messages_p50']:.0f}" for r in rows),
            )
        )
        print(
            _row(
                "  marketplace CPU us per instance",
                *(f"{r['search'][key]['cpu_us_per_instance']:.0f}" for r in rows),
            )
        )
        print(
            _row(
                "  fleet (all N AIIDAs) CPU us per instance",
                *(f"{r['search'][key]['fleet_cpu_us_per_instance']:.0f}" for r in rows),
            )
        )
    print(
        _row("floor client CPU us per instance", *(f"{r['floor']['cpu_us_per_instance']:.0f}" for r in rows))
    )
    print(
        _row("floor client KiB per idle stream", *(f"{r['floor']['rss_per_stream_kib']:.1f}" for r in rows))
    )
    print(
        _row(
            "marketplace KiB per connected AIIDA",
            *(f"{r['search']['rss_per_instance_kib']:.1f}" for r in rows),
        )
    )
    print(_row("ratio memory", *(f"{r['ratio_memory']:.2f}" for r in rows)))
    print(
        _row(
            "  restarted, all streams up: KiB (ratio)",
            *(
                f"{r['search']['rss_per_instance_restarted_kib']:.1f} ({r['ratio_memory_restarted']:.2f})"
                for r in rows
                if "rss_per_instance_restarted_kib" in r["search"]
            ),
        )
    )
    print(_row("floor: open all N streams s", *(f"{r['floor']['open_s']:.1f}" for r in rows)))
    print(
        _row(
            "  CPU s: floor client / server",
            *(f"{r['floor']['open_cpu_s']:.1f} / {r['floor']['open_server_cpu_s']:.1f}" for r in rows),
        )
    )
    print(
        _row(
            "restart -> search reaches all s",
            *(f"{r['search']['restart_to_full_reach_s']:.1f}" for r in rows),
        )
    )
    print(
        _row(
            "  ratio to the floor opening its N streams",
            *(f"{r['ratio_restart']:.2f}" for r in rows),
        )
    )
    print(
        _row(
            "  of which marketplace start-up s",
            *(f"{r['search']['restart_to_listening_s']:.1f}" for r in rows),
        )
    )
    print(
        _row(
            "  CPU s: marketplace (with start-up) / fleet",
            *(f"{r['search']['restart_cpu_s']:.1f} / {r['search']['restart_fleet_cpu_s']:.1f}" for r in rows),
        )
    )
    print(_row("claims per second", *(f"{r['search']['claims_per_s']:.0f}" for r in rows)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated fleet sizes")
    parser.add_argument(
        "--searches",
        type=int,
        default=0,
        help="timed searches per size and kind, the floor's too (after one warm-up); default: "
        f"{SAMPLES_PER_SIZE:,} / N, at least 7 (a p50 of 7 samples at 1,000 moved by 10 %% between runs)",
    )
    parser.add_argument(
        "--skip-access", action="store_true", help="skip the W6 approval/revocation latencies"
    )
    parser.add_argument(
        "--sink-churn", action="store_true", help="also run the sink soak: 1,000 reconnecting publish streams"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also run the cluster figures (needs PostgreSQL 127.0.0.1:5432 and NATS 127.0.0.1:4222)",
    )
    parser.add_argument(
        "--cluster-sizes", default="10000", help="comma-separated fleet sizes of the cluster figures"
    )
    parser.add_argument(
        "--cluster-searches", type=int, default=15, help="timed searches per replica count (cluster)"
    )
    parser.add_argument(
        "--cluster-idle",
        type=float,
        default=30.0,
        help="seconds of each idle window (leases, heartbeats; a resync every 15 s)",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "search": [],
    }
    with tempfile.TemporaryDirectory(prefix="eddie-bench-") as tmp:
        work = Path(tmp)
        for n in (int(s) for s in args.sizes.split(",") if s):
            searches = args.searches or max(7, SAMPLES_PER_SIZE // n)
            print(f"N={n:,}: floor ...", flush=True)
            floor_before = search.floor(n, searches, work)
            print(f"N={n:,}: marketplace + fleet ...", flush=True)
            product = search.product(n, searches, work)
            print(f"N={n:,}: floor again ...", flush=True)
            floor = bracketing_floor(floor_before, search.floor(n, searches, work))
            report["search"].append(
                {
                    "n": n,
                    "floor": floor,
                    "search": product,
                    "ratios": {key: product[key]["p50_ms"] / floor["p50_ms"] for key in SEARCH_LABELS},
                    "ratio_memory": product["rss_per_instance_kib"] / floor["rss_per_stream_kib"],
                    "ratio_memory_restarted": product["rss_per_instance_restarted_kib"]
                    / floor["rss_per_stream_kib"],
                    # The restart against the floor opening its N streams in the same run: the
                    # machine's speed moves both (the floor's opening at 10,000 took 2.0-5.4 s here).
                    "ratio_restart": product["restart_to_full_reach_s"] / floor["open_s"],
                }
            )
            print(json.dumps(report["search"][-1]), flush=True)
        if args.sink_churn:
            from bench import sink_churn

            print("sink under churn: 1,000 reconnecting publish streams, EPs listing ...", flush=True)
            report["sink_churn"] = sink_churn.run(work / "sink-churn")
        if args.cluster:
            from bench import cluster

            reason = cluster.unavailable_reason()
            if reason is None:
                sizes = [int(s) for s in args.cluster_sizes.split(",") if s]
                report["cluster"] = cluster.run(sizes, args.cluster_searches, args.cluster_idle, work)
            else:
                print(f"cluster figures skipped: {reason}", flush=True)
                report["cluster"] = {"skipped": reason}
        if not args.skip_access:
            from bench import access

            print("W6: approval -> first reading, revocation -> last reading ...", flush=True)
            report["access"] = access.run(work)
    report["load_after"] = os.getloadavg()
    if report["search"]:
        print_search_table(report["search"])
    if "sink_churn" in report:
        from bench import sink_churn

        sink_churn.print_figures(report["sink_churn"])
    if report.get("cluster", {}).get("sizes"):
        from bench import cluster

        cluster.print_figures(report["cluster"])
    if "access" in report:
        a = report["access"]
        print()
        print(
            _row(
                "W6 approval -> first reading at sink",
                f"p50 {a['approval_to_first_reading_p50_ms']:.0f} ms",
                f"p95 {a['approval_to_first_reading_p95_ms']:.0f} ms",
            )
        )
        print(_row("W6 revocation -> last reading", f"max {a['revocation_to_last_reading_max_ms']:.0f} ms"))
    load = ", ".join(f"{x:.1f}" for x in report["load_before"])
    print(f"\nload average before the run: {load} ({report['cpus']} CPUs)")
    out = RESULTS / "bench.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
