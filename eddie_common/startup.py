"""One start-up path for the three programs: check everything first, fail in one line.

A program's `main` parses its flags (bad flags: one line, exit 2, see `eddie_common.flags`),
then calls `run_main`, which runs the program's preflight checks (files, directories, ports:
nothing is opened or created yet) and then its serving coroutine. Any failure becomes ONE
line on stderr, `program: error: what failed: the value — a hint`, and exit status 2 when
the operator's input cannot work (`UsageError`) or 1 when a dependency is unavailable
(`Unavailable`; also anything unexpected). `--log-level debug` prints the traceback first.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from eddie_common.cli import split_host_port
from eddie_common.failures import StartupError, Unavailable, UsageError
from eddie_common.serving import run_program

__all__ = [
    "StartupError",
    "Unavailable",
    "UsageError",
    "free_port",
    "readable_file",
    "run_main",
    "writable_dir",
]

Translate = Callable[[BaseException], StartupError | None]


def run_main(
    program: str,
    log_level: str,
    preflight: Callable[[], None],
    serve: Callable[[], Coroutine[Any, Any, int | None]],
    translate: Translate | None = None,
) -> int:
    """Preflight, then serve until done; returns the exit status (one line on stderr on failure)."""
    try:
        preflight()
        return run_program(serve()) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        error = _as_startup_error(exc, translate)
        if log_level == "debug":
            traceback.print_exception(exc, file=sys.stderr)
        print(error.line(program), file=sys.stderr, flush=True)
        return error.status


def _as_startup_error(exc: Exception, translate: Translate | None) -> StartupError:
    if isinstance(exc, StartupError):
        return exc
    translated = translate(exc) if translate is not None else None
    if translated is not None:
        return translated
    if isinstance(exc, OSError) and exc.filename is not None:
        return UsageError(f"{exc.filename}: {exc.strerror or exc}")
    return StartupError(
        f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "),
        "run with --log-level debug for the traceback",
    )


# -- preflight checks: nothing is created or opened for good -------------------------------------


def readable_file(flag: str, path: Path | None) -> None:
    """`path` (when given) is an existing regular file this process can read."""
    if path is None:
        return
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file", "check the path")
    if not path.is_file():
        raise UsageError(f"{flag} {path}: not a regular file", "give the PEM file itself")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it ({exc.strerror})", "check its permissions") from None


def writable_dir(flag: str, path: Path) -> None:
    """`path` is a directory this process can write, or one it can create (it is not created here)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is not a directory", "choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"{flag} {path}: {existing} is not writable", "choose a directory this user may write to"
        )


def free_port(flag: str, listen: str, program: str) -> None:
    """`listen` can be bound now: the host is an address of this machine and the port is free."""
    host, port = split_host_port(listen)
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(
            f"{flag} {listen}: cannot resolve {host} ({exc.strerror})", "check the host"
        ) from None
    failures: list[OSError] = []
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                failures.append(exc)
    in_use = [f for f in failures if f.errno == errno.EADDRINUSE]
    if in_use:
        raise UsageError(
            f"{flag}: cannot listen on {listen}: port {port} is in use",
            f"is another {program} running? choose {flag} HOST:0 for a free port",
        )
    if failures and len(failures) == len(infos):
        raise UsageError(
            f"{flag}: cannot listen on {listen}: {failures[0].strerror}",
            "use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0",
        )
