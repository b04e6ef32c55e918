"""`make cluster` (scripts/cluster.py) as a real process: it says how to reach every replica, and
Ctrl-C or SIGTERM, also during start-up, leaves neither its PostgreSQL schema nor a process behind.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cluster.test_events import nats_reachable
from tests.support.postgres import POSTGRES_URL, postgres_execute, postgres_reachable

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.nats]
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster.py"
OFFSETS = (0, 1, 2, 10, 20)  # the replicas, the fleet, the sink


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_base() -> int:
    for _ in range(50):
        base = random.randrange(20_000, 40_000)
        if not any(_listening(base + offset) for offset in OFFSETS):
            return base
    raise AssertionError("no free port range for the cluster")


class Cluster:
    """scripts/cluster.py with a fleet of two on free ports; its stdout collected in the background."""

    def __init__(self) -> None:
        if not postgres_reachable():
            pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
        if not nats_reachable():
            pytest.skip("NATS is not reachable on 127.0.0.1:4222")
        self.base = _free_base()
        env = {
            **os.environ,
            "CLUSTER_DATABASE_URL": POSTGRES_URL,
            "CLUSTER_FLEET": "2",
            "CLUSTER_BASE_PORT": str(self.base),
            "PYTHONUNBUFFERED": "1",
        }
        command = [sys.executable, str(SCRIPT)]
        self.popen = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        self.lines: list[str] = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            assert self.popen.poll() is None, f"cluster.py exited: {self.lines[-20:]}"
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}: {self.lines[-20:]}")

    def stop(self, sig: int) -> int:
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(90)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
            self.pump.join(10)  # every line read

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


async def _schema_exists(schema: str) -> bool:
    query = f"SELECT count(*) FROM information_schema.schemata WHERE schema_name = '{schema}'"
    return bool(await postgres_execute(query))


@pytest.mark.timeout(240)
async def test_sigterm_drops_the_schema_and_every_replica_is_named() -> None:
    cluster = Cluster()
    try:
        schema = cluster.wait_for(r"^schema (cluster_[0-9a-f]+),").group(1)
        assert await _schema_exists(schema)
        for i in range(3):
            address = f"127.0.0.1:{cluster.base + i}"
            assert f"replica-{i}  eddie --marketplace {address}" in cluster.text, cluster.text
        fleet = Path(cluster.wait_for(r"pairing codes: (\S+)").group(1))
        assert fleet.parent.is_dir()
    finally:
        code = cluster.stop(signal.SIGTERM)
    assert code == 0, cluster.lines[-20:]
    assert not await _schema_exists(schema)
    assert not fleet.parent.exists()
    assert f"dropped schema {schema}" in cluster.text
    assert not any(_listening(cluster.base + offset) for offset in OFFSETS)


@pytest.mark.timeout(240)
async def test_ctrl_c_during_start_up_leaves_no_schema_and_no_replica() -> None:
    cluster = Cluster()
    try:
        cluster.wait_for(r"^replica-0 +listening on")
    finally:
        code = cluster.stop(signal.SIGINT)  # replica 1 (or 2) is starting
    assert code == 0, cluster.lines[-20:]
    schema = cluster.wait_for(r"dropped schema (cluster_[0-9a-f]+)", timeout=1).group(1)
    assert not await _schema_exists(schema)
    assert not any(_listening(cluster.base + offset) for offset in OFFSETS)
