"""The bare grpc.aio broadcast floor (no application logic), as PERFORMANCE.md defines it.

`serve`: one process hosting N device endpoints behind one port (every stream
answers each ~40-byte query with a ~40-byte reply). `client`: opens N bidi
streams on one channel, then per search sends the query down each stream and
awaits one reply from each (one task per stream writing then reading). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psutil

METHOD = "/floor.Device/Connect"
OPTIONS = [
    ("grpc.server.max_pending_requests", 1_000_000),
    ("grpc.server.max_pending_requests_hard_limit", 1_000_000),
]
QUERY = b"q" * 40
REPLY = b"r" * 40


def _raw(data: bytes) -> bytes:
    return data


async def _device(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield REPLY


async def device_server(port: int = 0) -> tuple[grpc.aio.Server, int]:
    """A started server of device endpoints on 127.0.0.1:`port` (0: a free one), and its port."""
    server = grpc.aio.server(options=OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(
        _device, request_deserializer=_raw, response_serializer=_raw
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("floor.Device", {"Connect": handler})]
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


async def serve(port: int) -> None:
    server, bound = await device_server(port)
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


async def _open(channel: grpc.aio.Channel, n: int, batch: int = 500) -> list[Any]:
    multi = channel.stream_stream(METHOD, request_serializer=_raw, response_deserializer=_raw)
    calls: list[Any] = []
    for start in range(0, n, batch):
        chunk = [multi() for _ in range(min(batch, n - start))]
        # Confirm each stream is up with one round trip.
        await asyncio.gather(*(_round_trip(c) for c in chunk))
        calls.extend(chunk)
    return calls


async def _round_trip(call: Any) -> None:
    await call.write(QUERY)
    await call.read()


def cpu_seconds(proc: psutil.Process | None) -> float:
    """The user + system CPU seconds `proc` has used (0 for no process)."""
    return sum(proc.cpu_times()[:2]) if proc is not None else 0.0


async def client(target: str, n: int, searches: int, server_pid: int | None = None) -> dict[str, Any]:
    proc = psutil.Process()
    server = psutil.Process(server_pid) if server_pid else None
    rss_before = proc.memory_info().rss
    channel = grpc.aio.insecure_channel(target)
    t0 = time.perf_counter()
    cpu0, server_cpu0 = cpu_seconds(proc), cpu_seconds(server)
    calls = await _open(channel, n)
    open_s = time.perf_counter() - t0
    # Opening is CPU-bound at both ends (the server side, one process for N devices, the more so):
    # what each spent says which bounds `open_s`.
    open_cpu_s, open_server_cpu_s = cpu_seconds(proc) - cpu0, cpu_seconds(server) - server_cpu0
    gc.collect()
    gc.freeze()
    rss_per_stream = (proc.memory_info().rss - rss_before) / n
    samples = []
    cpu_before = cpu_seconds(proc)
    for _ in range(searches):
        t = time.perf_counter()
        await asyncio.gather(*(_round_trip(c) for c in calls))
        samples.append(time.perf_counter() - t)
    cpu_per_search = (cpu_seconds(proc) - cpu_before) / searches
    for c in calls:
        c.cancel()
    await channel.close()
    return {
        "n": n,
        "open_s": open_s,
        "open_cpu_s": open_cpu_s,
        "open_server_cpu_s": open_server_cpu_s,
        "p50_ms": statistics.median(samples) * 1000,
        "p95_ms": _p95(samples) * 1000,
        "rss_per_stream_kib": rss_per_stream / 1024,
        "cpu_us_per_instance": cpu_per_search / n * 1e6,
        "pid": os.getpid(),
    }


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--searches", type=int, default=10)
    c.add_argument("--server-pid", type=int, default=0, help="the serving process, whose CPU to report")
    args = parser.parse_args()
    if args.mode == "serve":
        asyncio.run(serve(args.port))
    else:
        result = asyncio.run(client(args.target, args.n, args.searches, args.server_pid))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
