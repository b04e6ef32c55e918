"""The demo's people at a shell: `eddie` run as a child process, each with a session of their own."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any


def eddie_command() -> list[str]:
    """The installed `eddie` script next to this interpreter, else the package run as a module."""
    script = Path(sys.executable).parent / "eddie"
    return [str(script)] if script.exists() else [sys.executable, "-m", "eddie_cli"]


class CommandLine:
    """One person's `eddie`: their own XDG_CONFIG_HOME (session), the marketplace, the password."""

    def __init__(self, marketplace: str, home: Path, password: str) -> None:
        self.env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(home),
            "EDDIE_MARKETPLACE": marketplace,
            "EDDIE_PASSWORD": password,
            "COLUMNS": "120",
        }

    async def run(self, *args: str) -> str:
        """`eddie ARGS`; its stdout, or RuntimeError with its stderr line."""
        process = await asyncio.create_subprocess_exec(
            *eddie_command(),
            *args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"eddie {' '.join(args)} failed: {err.decode().strip()}")
        return out.decode()

    async def show(self, *args: str) -> str:
        """Runs `eddie ARGS` and prints the command and what it printed, as on a terminal."""
        out = await self.run(*args)
        print(f"      $ eddie {shlex.join(args)}", flush=True)
        for line in out.rstrip().splitlines():
            print(f"      {line.rstrip()}", flush=True)
        return out

    async def json(self, *args: str) -> Any:
        """`eddie ARGS --output json`, parsed; the command is printed."""
        print(f"      $ eddie {shlex.join(args)} --output json", flush=True)
        return json.loads(await self.run(*args, "--output", "json"))
