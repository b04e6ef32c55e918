"""The program: flags, the pairing-code print, clean exits."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aiida_stub.config import build_parser, parse_config
from tests.support.stub import FakeMarketplace

ROOT = Path(__file__).resolve().parents[2]
FLAGS = [
    "--listen",
    "--advertise",
    "--marketplace",
    "--state-dir",
    "--profile",
    "--instance-id",
    "--pairing-code",
    "--time-scale",
    "--fleet",
    "--id-prefix",
    "--log-level",
    "--grace-period",
    "--tls-cert",
    "--tls-key",
    "--marketplace-ca",
    "--sink-ca",
]


def test_help_lists_every_flag_with_its_environment_variable() -> None:
    result = _run_stub("--help")
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout
        assert "AIIDA_" + flag.lstrip("-").upper().replace("-", "_") in result.stdout


def test_flags_fall_back_to_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIIDA_MARKETPLACE", "127.0.0.1:1234")
    monkeypatch.setenv("AIIDA_PROFILE", "a.toml,b.toml")
    monkeypatch.setenv("AIIDA_TIME_SCALE", "60")
    config = parse_config([])
    assert config.marketplace == "127.0.0.1:1234"
    assert config.profiles == (Path("a.toml"), Path("b.toml"))
    assert config.time_scale == 60.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--marketplace", "nohost"],
        ["--marketplace", "h:1", "--pairing-code", "a b"],
        ["--marketplace", "h:1", "--instance-id", "x"],
        ["--marketplace", "h:1", "--time-scale", "0"],
        ["--marketplace", "h:1", "--fleet", "3", "--instance-id", "abc"],
        ["--marketplace", "h:1", "--tls-cert", "c.pem"],
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_config(argv)
    assert caught.value.code == 2


def test_parser_documents_every_flag() -> None:
    for action in build_parser()._actions:
        assert action.help, action.dest


def run_stub(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aiida_stub", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_program_prints_the_pairing_code_and_stops_cleanly(
    tmp_path: Path, marketplace: FakeMarketplace
) -> None:
    proc = run_stub(
        "--marketplace", marketplace.address, "--state-dir", str(tmp_path), "--pairing-code", "K7MX-3QPA"
    )
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or not lines[-1].startswith("listening on "):
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
            assert line, "program ended early"
            lines.append(line.strip())
        assert "pairing code: K7MX-3QPA" in lines
        assert re.fullmatch(r"listening on 127\.0\.0\.1:\d+", lines[-1])
        for _ in range(200):  # registration runs in the background
            if marketplace.service.pairing_codes:
                break
            await asyncio.sleep(0.05)
        assert list(marketplace.service.pairing_codes.values()) == ["K7MX-3QPA"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
    assert proc.returncode == 0, stderr
    assert "Pairing code:      K7MX-3QPA" in stderr  # the box
    assert "secret" not in stderr.lower()


async def test_rejected_registration_exits_non_zero(tmp_path: Path, marketplace: FakeMarketplace) -> None:
    marketplace.service.secrets["aiida-taken"] = "x" * 43  # another device pinned this id
    proc = run_stub(
        "--marketplace", marketplace.address, "--state-dir", str(tmp_path), "--instance-id", "aiida-taken"
    )
    _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 1
    assert "registration_rejected" in stderr
    assert "PERMISSION_DENIED" in stderr


def _run_stub(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m aiida_stub ARGS` to completion (it is expected to exit by itself)."""
    return subprocess.run(
        [sys.executable, "-m", "aiida_stub", *args], capture_output=True, text=True, cwd=ROOT, timeout=30
    )


def test_bad_profile_exits_with_a_readable_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('region = "AT-9"\nseed = 1\n')
    result = _run_stub("--marketplace", "127.0.0.1:1", "--state-dir", str(tmp_path), "--profile", str(bad))
    assert result.returncode == 2
    assert f"{bad}: sources" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_exits_with_a_readable_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_stub(
            "--marketplace", "127.0.0.1:1", "--state-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}"
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
