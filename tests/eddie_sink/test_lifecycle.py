"""The program: flags, the `listening on` line, restarts on the same data directory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.sink import FakeMarketplace, reading, sink_config, start_sink

REPO = Path(__file__).resolve().parents[2]


async def test_readings_and_page_tokens_survive_a_restart(tmp_path: Path, fake_marketplace: FakeMarketplace):
    config = sink_config(tmp_path, fake_marketplace.address)
    access = fake_marketplace.access_token()
    sink = await start_sink(config)
    await sink.publish(fake_marketplace.sink_token(), [reading(s) for s in range(3)])
    first = await sink.list_page(access, page_size=2)
    await sink.close()

    sink = await start_sink(config)
    try:
        rest = await sink.list_page(access, page_size=2, page_token=first.next_page_token)
        assert [r.time.seconds - 1_700_000_000 for r in rest.readings] == [2]
        assert await sink.publish(fake_marketplace.sink_token(), [reading(2), reading(3)]) == 2
        assert len(await sink.list_all(access)) == 4
    finally:
        await sink.close()


def test_help_documents_every_flag_with_its_environment_variable():
    result = subprocess.run(
        [sys.executable, "-m", "eddie_sink", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "listen",
        "marketplace",
        "data-dir",
        "jsonl",
        "log-level",
        "grace-period",
        "tls-cert",
        "tls-key",
        "marketplace-ca",
    ):
        assert f"--{flag}" in result.stdout
        assert "EDDIE_SINK_" + flag.upper().replace("-", "_") in result.stdout


def test_missing_marketplace_flag_is_a_usage_error(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDDIE_SINK_")}
    result = subprocess.run(
        [sys.executable, "-m", "eddie_sink", "--data-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 2
    assert "--marketplace" in result.stderr


async def test_program_prints_listening_line_serves_health_and_stops_on_sigterm(
    tmp_path: Path, fake_marketplace: FakeMarketplace
):
    env = {**os.environ, "EDDIE_SINK_MARKETPLACE": fake_marketplace.address}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eddie_sink",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode().strip()
        assert line.startswith("listening on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="eddie.framework.v1.DataSinkService"), timeout=5
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        # communicate() drains both pipes while waiting: a child whose shutdown logs filled the
        # stderr pipe would otherwise block on that write and never exit.
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == 0
        assert b"event=stopped" in stderr
        assert b"Bearer" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
