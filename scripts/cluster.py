"""`make cluster`: three marketplace replicas, an AIIDA fleet and a sink on this machine.

The replicas share a fresh PostgreSQL schema and one NATS server (the local ones
by default); each prints its own address. Ctrl-C stops everything (SIGTERM: the
replicas hand their buckets over). Environment: CLUSTER_DATABASE_URL,
CLUSTER_NATS_URL, CLUSTER_FLEET (instances, default 100), CLUSTER_BASE_PORT
(default 50061: replicas on 50061-50063, the fleet on 50071, the sink on 50081).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
DATABASE_URL = os.environ.get("CLUSTER_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("CLUSTER_NATS_URL", "nats://127.0.0.1:4222")
FLEET = int(os.environ.get("CLUSTER_FLEET", "100"))
BASE = int(os.environ.get("CLUSTER_BASE_PORT", "50061"))
_DRAINS: list[asyncio.Task[None]] = []


async def create_schema() -> str:
    schema = f"cluster_{secrets.token_hex(4)}"
    dsn = make_url(DATABASE_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(f"CREATE SCHEMA {schema}")
    finally:
        await connection.close()
    return schema


async def start(name: str, *args: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip()
    print(f"{name:10} {line}", flush=True)
    _DRAINS.append(asyncio.create_task(_drain(process.stdout)))
    return process


async def _drain(stream: asyncio.StreamReader) -> None:
    """Keeps the child's stdout flowing (a full pipe would block it)."""
    while line := await stream.readline():
        sys.stdout.write(line.decode())


async def main() -> None:
    var = REPO / "var" / "cluster"
    schema = await create_schema()
    prefix = f"eddie-{schema}"
    processes = []
    replicas = [f"127.0.0.1:{BASE + i}" for i in range(3)]
    try:
        for i, address in enumerate(replicas):
            processes.append(
                await start(
                    f"replica-{i}",
                    "marketplace_server",
                    "--listen",
                    address,
                    "--data-dir",  # throw-away: the signing keys are in the database
                    str(var / f"replica-{i}"),
                    "--database-url",
                    DATABASE_URL,
                    "--database-schema",
                    schema,
                    "--nats-url",
                    NATS_URL,
                    "--cluster-name",
                    prefix,
                    "--replica-id",
                    f"replica-{i}",
                )
            )
        processes.append(
            await start(
                "fleet",
                "aiida_stub",
                "--listen",
                f"127.0.0.1:{BASE + 10}",
                "--marketplace",
                replicas[0],
                "--state-dir",
                str(var / f"fleet-{schema}"),
                "--fleet",
                str(FLEET),
                "--id-prefix",
                "c",
            )
        )
        processes.append(
            await start(
                "sink",
                "eddie_sink",
                "--listen",
                f"127.0.0.1:{BASE + 20}",
                "--marketplace",
                replicas[1],
                "--data-dir",
                str(var / f"sink-{schema}"),
            )
        )
        print(
            f"\nschema {schema}, NATS subjects {prefix}.>; any replica serves any RPC, e.g.\n"
            f"  eddie --marketplace {replicas[2]} signup --email a@example.org --display-name A "
            "--role customer\n"
            f"  pairing codes: {var / f'fleet-{schema}' / 'fleet.csv'}\n"
            "Ctrl-C stops the cluster.",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for process in reversed(processes):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in processes), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
