"""How many new streams a busy grpc.aio server admits: the reason the cluster bench splits its fleet.

grpc.aio's server keeps one `request_call` outstanding and takes one new call per turn of its
event loop. `serve K busy` starts K servers in one process whose loop is kept busy the way a
fleet under search load is (turns of ~0.3 s: 10,000 callbacks of 30 µs every 0.2 s); `client
PORTS N` opens N bidi streams (256 at once, one round trip each) for 20 s and prints how many
opened. Measured on the 2-core machine (one run each): idle, one server opened 3,000 in 1.1 s;
busy, one server 33 of 3,000 in 20 s, four servers 143.

    python -m bench.accept serve 1 busy       # prints the ports
    python -m bench.accept client PORT[,PORT...] 3000
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import grpc

from bench.floor import METHOD, QUERY, _raw, device_server


def _work() -> None:
    started = time.perf_counter()
    while time.perf_counter() - started < 30e-6:
        pass


async def serve(count: int, busy: bool) -> None:
    servers = [await device_server() for _ in range(count)]
    print(",".join(str(port) for _, port in servers), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        if busy:
            for _ in range(10_000):
                loop.call_soon(_work)
        await asyncio.sleep(0.2)


async def client(ports: list[int], n: int, seconds: float = 20.0) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
    methods = [c.stream_stream(METHOD, request_serializer=_raw, response_deserializer=_raw) for c in channels]
    slots = asyncio.Semaphore(256)
    opened: list[Any] = []
    started = time.perf_counter()

    async def one(i: int) -> None:
        async with slots:
            call = methods[i % len(methods)]()
            await call.write(QUERY)
            await call.read()
            opened.append(call)

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await asyncio.wait(tasks, timeout=seconds)
    elapsed = time.perf_counter() - started
    print(f"opened {len(opened)} of {n} streams over {len(ports)} server(s) in {elapsed:.2f} s", flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "busy"))
    elif len(sys.argv) == 4 and sys.argv[1] == "client":
        asyncio.run(client([int(p) for p in sys.argv[2].split(",")], int(sys.argv[3])))
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
