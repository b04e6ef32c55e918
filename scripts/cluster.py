"""`make cluster`: three marketplace replicas, an AIIDA fleet and a sink on this machine.

The replicas share a fresh PostgreSQL schema and one NATS server (the local ones
by default); each prints its own address, and a summary says how to reach every
replica. Ctrl-C or SIGTERM stops everything (SIGTERM to each: the replicas hand
their buckets over), then drops the schema and removes the fleet's and the sink's
directories of this run: nothing of it is left behind. The fleet registers at
replica 0 only (aiida_stub takes one marketplace address); every replica serves
and dials its AIIDAs all the same. Environment: CLUSTER_DATABASE_URL,
CLUSTER_NATS_URL, CLUSTER_FLEET (instances, default 100), CLUSTER_BASE_PORT
(default 50061: replicas on 50061-50063, the fleet on 50071, the sink on 50081).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
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


STOP_TIMEOUT = 30.0  # seconds a child has to stop after SIGTERM before it is killed


async def _execute(statement: str) -> None:
    dsn = make_url(DATABASE_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def create_schema() -> str:
    schema = f"cluster_{secrets.token_hex(4)}"
    await _execute(f"CREATE SCHEMA {schema}")
    return schema


async def drop_schema(schema: str) -> None:
    await _execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def start(processes: list[asyncio.subprocess.Process], name: str, *args: str) -> None:
    """Starts `python -m ARGS`, added to `processes` at once (stopped with them even if stopped
    before it said it listens), and prints its first line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    processes.append(process)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip()
    print(f"{name:10} {line}", flush=True)
    _DRAINS.append(asyncio.create_task(_drain(process.stdout)))


async def _drain(stream: asyncio.StreamReader) -> None:
    """Keeps the child's stdout flowing (a full pipe would block it)."""
    while line := await stream.readline():
        sys.stdout.write(line.decode())


def stop_on_signals() -> None:
    """Ctrl-C or SIGTERM cancels the main task once (at start-up too); cleanup runs in its `finally`."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopping = False

    def on_signal() -> None:
        nonlocal stopping
        if stopping:
            print("still stopping: the replicas drain, then the schema is dropped", flush=True)
            return
        stopping = True
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)


async def stop_processes(processes: list[asyncio.subprocess.Process]) -> None:
    for process in reversed(processes):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), STOP_TIMEOUT)
    except TimeoutError:
        for process in processes:
            if process.returncode is None:
                process.kill()
        await asyncio.gather(*(p.wait() for p in processes))


def how_to_reach(schema: str, prefix: str, replicas: list[str], fleet: Path) -> str:
    lines = [
        "",
        f"schema {schema}, NATS subjects {prefix}.>; any replica serves any RPC:",
        *(f"  replica-{i}  eddie --marketplace {address} ..." for i, address in enumerate(replicas)),
        f"  e.g. eddie --marketplace {replicas[2]} signup --email a@example.org --display-name A "
        "--role customer",
        f"fleet: {FLEET} AIIDAs on 127.0.0.1:{BASE + 10}, registered at replica-0 ({replicas[0]}) only "
        "(aiida-stub takes one marketplace address); the replicas share dialling them",
        f"  pairing codes: {fleet / 'fleet.csv'}",
        f"sink: 127.0.0.1:{BASE + 20}, following replica-1 ({replicas[1]})",
        "Ctrl-C stops the cluster and drops the schema.",
    ]
    return "\n".join(lines)


async def main() -> None:
    stop_on_signals()
    var = REPO / "var" / "cluster"
    creating = asyncio.create_task(create_schema())
    try:
        schema = await asyncio.shield(creating)
    except asyncio.CancelledError:  # stopped while the schema was being created: drop it once it is
        await drop_schema(await creating)
        return
    prefix = f"eddie-{schema}"
    fleet_dir, sink_dir = var / f"fleet-{schema}", var / f"sink-{schema}"
    processes: list[asyncio.subprocess.Process] = []
    replicas = [f"127.0.0.1:{BASE + i}" for i in range(3)]
    try:
        await run_cluster(schema, prefix, replicas, var, fleet_dir, sink_dir, processes)
    except asyncio.CancelledError:
        asyncio.current_task().uncancel()  # type: ignore[union-attr]  # Ctrl-C / SIGTERM: clean up below
    finally:
        await stop_processes(processes)
        await drop_schema(schema)
        for directory in (fleet_dir, sink_dir):
            shutil.rmtree(directory, ignore_errors=True)
        print(f"stopped; dropped schema {schema}, removed {fleet_dir.name} and {sink_dir.name}", flush=True)


async def run_cluster(
    schema: str,
    prefix: str,
    replicas: list[str],
    var: Path,
    fleet_dir: Path,
    sink_dir: Path,
    processes: list[asyncio.subprocess.Process],
) -> None:
    """Starts the replicas, the fleet and the sink (each added to `processes`); runs until cancelled."""
    for i, address in enumerate(replicas):
        await start(
            processes,
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
    fleet = ("--fleet", str(FLEET), "--id-prefix", "c", "--state-dir", str(fleet_dir))
    # aiida_stub takes one marketplace address: the fleet registers at replica 0.
    await start(
        processes,
        "fleet",
        "aiida_stub",
        "--listen",
        f"127.0.0.1:{BASE + 10}",
        "--marketplace",
        replicas[0],
        *fleet,
    )
    await start(
        processes,
        "sink",
        "eddie_sink",
        "--listen",
        f"127.0.0.1:{BASE + 20}",
        "--marketplace",
        replicas[1],
        "--data-dir",
        str(sink_dir),
    )
    print(how_to_reach(schema, prefix, replicas, fleet_dir), flush=True)
    await asyncio.Event().wait()  # until Ctrl-C or SIGTERM cancels


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
