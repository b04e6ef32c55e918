"""W6 latency benchmark: approval -> first reading at the sink, revocation -> last reading.

A marketplace, an EP sink and one AIIDA run as separate processes (the AIIDA's
simulated clock runs `TIME_SCALE` times faster, so one-minute readings come every
0.1 s). Each trial asks for access, the customer approves with `DecideAccess`,
and the sink is polled every `POLL_S` until the permission's first reading is
stored there; then the customer revokes, and the sink is watched for `SETTLE_S`
to find when the last reading arrived. Polling adds up to `POLL_S` to each figure.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from bench.floor import _p95
from eddie_client import ROLE_CUSTOMER, ROLE_ELIGIBLE_PARTY, MarketplaceClient, data_need, procs
from eddie_client.client import list_readings

PASSWORD = "benchmark passphrase 2026"
PROFILES = Path(__file__).resolve().parent.parent / "aiida_stub" / "profiles"
TIME_SCALE = 600
POLL_S = 0.005
SETTLE_S = 1.5
HOLD_S = 0.6


def run(work: Path, trials: int = 15) -> dict[str, Any]:
    logs = work / "access-logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: list[procs.Proc] = []
    try:
        mp = procs.start_marketplace(work / "access-mp", logs, name="bench-marketplace")
        started.append(mp)
        sink = procs.start_sink(mp.address, work / "sink", logs, name="bench-sink")
        started.append(sink)
        aiida = procs.start_aiida(
            mp.address,
            work / "aiida",
            PROFILES / "vienna-p1.toml",
            logs,
            *(
                "--time-scale",
                str(TIME_SCALE),
                "--instance-id",
                "aiida-bench",
                "--pairing-code",
                "BENCH-2026",
            ),
            name="bench-aiida",
        )
        started.append(aiida)
        return asyncio.run(_measure(mp.address, sink.address, trials))
    finally:
        for p in reversed(started):
            p.stop()


async def _measure(marketplace: str, sink: str, trials: int) -> dict[str, Any]:
    async with MarketplaceClient(marketplace) as mp:
        ep = await mp.sign_up(ROLE_ELIGIBLE_PARTY, "ep@bench.example", PASSWORD, "Bench EP")
        customer = await mp.sign_up(ROLE_CUSTOMER, "home@bench.example", PASSWORD, "Bench home")
        await customer.claim("aiida-bench", "BENCH-2026", wait=30)
        async with asyncio.timeout(30):
            while not all(i.connected for i in await customer.list_instances()):
                await asyncio.sleep(0.05)
        request = await ep.create_data_request(
            "Latency study", "Benchmark", data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 60, 0, 86400, [])
        )
        matches, _ = await ep.search(request.name, timeout=3)
        assert matches == ["aiida-bench"], matches
        first: list[float] = []
        last: list[float] = []
        after: list[int] = []
        before: list[int] = []
        for _ in range(trials):
            (permission,) = await ep.request_access(request.name, ["aiida-bench"], f"grpc://{sink}")
            pid = permission.name.removeprefix("permissions/")
            approved = time.perf_counter()
            await customer.decide(permission.name, approve=True)
            while not await list_readings(sink, pid, ep.token):
                await asyncio.sleep(POLL_S)
            first.append((time.perf_counter() - approved) * 1000)

            await asyncio.sleep(HOLD_S)  # let it stream for a while, then revoke mid-stream
            revoked = time.perf_counter()
            await customer.revoke(permission.name, "benchmark trial over")
            count = at_revoke = len(await list_readings(sink, pid, ep.token))
            changed = revoked
            while time.perf_counter() - revoked < SETTLE_S:
                await asyncio.sleep(POLL_S)
                now = len(await list_readings(sink, pid, ep.token))
                if now != count:
                    count, changed = now, time.perf_counter()
            last.append((changed - revoked) * 1000)
            after.append(count - at_revoke)
            before.append(at_revoke)
    return {
        "trials": trials,
        "time_scale": TIME_SCALE,
        "approval_to_first_reading_p50_ms": statistics.median(first),
        "approval_to_first_reading_p95_ms": _p95(first),
        "revocation_to_last_reading_max_ms": max(last),
        "revocation_to_last_reading_p50_ms": statistics.median(last),
        "readings_at_revocation_min": min(before),
        "readings_after_revocation_max": max(after),
    }


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="eddie-bench-access-") as tmp:
        print(json.dumps(run(Path(tmp)), indent=2))
