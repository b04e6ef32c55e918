"""Starting the suite's programs as real processes and waiting for their `listening on` line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class Proc:
    """A child process with its stdout collected in the background."""

    name: str
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    port: int = 0

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                match = regex.search(self.lines[seen])
                seen += 1
                if match:
                    return match
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}: {self.lines[-20:]}")
            time.sleep(0.02)
        raise TimeoutError(f"{self.name}: no line matching {pattern!r} within {timeout}s")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def start(
    name: str,
    args: list[str],
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Proc:
    """Starts `python -m <args>` and waits for its `listening on HOST:PORT` line."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    stderr = open(log_dir / f"{name}.log", "a") if log_dir else subprocess.DEVNULL  # noqa: SIM115
    popen = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=stderr, text=True, env=full_env
    )
    proc = Proc(name, popen)

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            proc.lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        match = proc.wait_for(LISTENING.pattern, timeout)
    except BaseException:
        proc.kill()  # it never said where it listens: nobody could stop it later
        raise
    proc.port = int(match.group(2))
    return proc


def start_all(starters: Sequence[Callable[[], Proc]]) -> list[Proc]:
    """Runs the `start_*` calls at once (each waits for its own `listening on` line); all or none:
    if one fails, those that started are stopped and its error raised."""
    with ThreadPoolExecutor(max(1, len(starters))) as pool:
        futures = [pool.submit(starter) for starter in starters]
    started, errors = [], []
    for future in futures:
        try:
            started.append(future.result())
        except Exception as exc:
            errors.append(exc)
    if errors:
        stop_all(started)
        raise errors[0]
    return started


def stop_all(procs: Sequence[Proc], timeout: float = 10.0) -> None:
    """Stops the processes together: SIGTERM to all, then waits for each (SIGKILL after `timeout`).

    Each drains for its grace period; stopped one after the other those waits would add up."""
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()


# The three programs with the flags every caller gives them; `flags` adds the rest.


def start_marketplace(
    data_dir: Path,
    log_dir: Path | None,
    *flags: str,
    name: str = "marketplace",
    listen: str = "127.0.0.1:0",
    timeout: float = 60.0,
) -> Proc:
    """A marketplace on `listen` (a free port by default) with its data in `data_dir`."""
    args = ["marketplace_server", "--listen", listen, "--data-dir", str(data_dir), *flags]
    return start(name, args, log_dir, timeout=timeout)


def start_sink(
    marketplace: str, data_dir: Path, log_dir: Path | None, *flags: str, name: str = "eddie-sink"
) -> Proc:
    """An EP sink on a free port that trusts the marketplace at `marketplace`."""
    args = [
        "eddie_sink",
        "--listen",
        "127.0.0.1:0",
        "--marketplace",
        marketplace,
        "--data-dir",
        str(data_dir),
    ]
    return start(name, [*args, *flags], log_dir)


def start_aiida(
    marketplace: str,
    state_dir: Path,
    profile: Path,
    log_dir: Path | None,
    *flags: str,
    name: str = "aiida-stub",
    timeout: float = 60.0,
) -> Proc:
    """An aiida-stub (a fleet with `--fleet N` in `flags`) on a free port, registering at `marketplace`."""
    args = ["aiida_stub", "--listen", "127.0.0.1:0", "--marketplace", marketplace]
    args += ["--state-dir", str(state_dir), "--profile", str(profile)]
    return start(name, [*args, *flags], log_dir, timeout=timeout)
