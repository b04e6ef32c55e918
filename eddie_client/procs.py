"""Starting the suite's programs as real processes and waiting for their `listening on` line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
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
    match = proc.wait_for(LISTENING.pattern, timeout)
    proc.port = int(match.group(2))
    return proc
