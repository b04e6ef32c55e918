"""Health, reflection, TLS, and the signal-driven lifecycle every program shares."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from eddie_common.failures import UsageError
from eddie_common.logging import log_event
from eddie_common.reflection import enable_reflection

log = logging.getLogger(__name__)

# Server options shared by every program: bounded messages, keepalive, and a
# pending-call queue large enough for thousands of streams opened at once.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.server.max_pending_requests", 1_000_000),
    ("grpc.server.max_pending_requests_hard_limit", 1_000_000),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener (and optional client CA for mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def given(cls, cert: Path | None, key: Path | None, client_ca: Path | None = None) -> TlsFiles | None:
        """The files of `--tls-cert`, `--tls-key` (and `--tls-client-ca`); None, plaintext, unless
        both the certificate and the key are given."""
        if cert is None or key is None:
            return None
        return cls(cert, key, client_ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> health.aio.HealthServicer:
    """Serves grpc.health.v1 (overall "" and per service) and reflection."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        *service_names,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    enable_reflection(names, server)
    return health_servicer


async def set_serving(
    health_servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool
) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await health_servicer.set(name, status)


def bind(server: grpc.aio.Server, listen: str, tls: TlsFiles | None) -> int:
    """Binds `listen` (port 0 picks a free one) and returns the bound port."""
    try:
        if tls is not None:
            port = server.add_secure_port(listen, tls.server_credentials())
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError:  # grpc's "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise UsageError(
            f"cannot listen on {listen}", "is the port in use? choose --listen HOST:0 for a free port"
        )
    return port


@dataclass
class Lifecycle:
    """Start/stop hooks of a program around its gRPC server."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    service_names: Sequence[str]
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run before the drain: end long-lived streams (feeds, watches) that would hold the whole grace.
    before_stop: list[Callable[[], None]] = field(default_factory=list)
    # Awaited after those, still before the drain (e.g. a cluster replica hands its work over first).
    before_drain: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first, then drains in-flight RPCs for up to `grace` seconds."""
        await set_serving(self.health, self.service_names, False)
        for end in self.before_stop:
            try:
                end()
            except Exception as exc:
                hook = getattr(end, "__qualname__", "?")
                log_event(log, "stop_hook_failed", logging.WARNING, hook=hook, error=repr(exc))
        for hand_over in self.before_drain:
            try:
                await hand_over()
            except Exception as exc:
                hook = getattr(hand_over, "__qualname__", "?")
                log_event(log, "stop_hook_failed", logging.WARNING, hook=hook, error=repr(exc))
        await self.server.stop(grace)
        for hook in self.on_stop:
            try:
                await hook()
            except Exception as exc:  # one failing hook must not keep the others from running
                log_event(
                    log,
                    "stop_hook_failed",
                    logging.WARNING,
                    hook=getattr(hook, "__qualname__", "?"),
                    error=repr(exc),
                )


def announce(host: str, port: int) -> None:
    """Prints the one line operators and tests wait for."""
    print(f"listening on {host}:{port}", flush=True)
    sys.stdout.flush()


async def run_until_signal(lifecycle: Lifecycle, host: str, port: int, grace: float, program: str) -> None:
    """Serves until SIGINT/SIGTERM, then shuts down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await set_serving(lifecycle.health, lifecycle.service_names, True)
    announce(host, port)
    log_event(log, "serving", program=program, address=f"{host}:{port}")
    await stop.wait()
    log_event(log, "shutting_down", program=program, grace_seconds=grace)
    await lifecycle.stop(grace)
    log_event(log, "stopped", program=program)


# How long the tasks still running after a program's main coroutine returned get to react to
# cancellation. A task blocked on a gRPC call whose channel or server is already gone may never
# finish; asyncio.run would wait for it forever and the process would ignore SIGTERM.
LEFTOVER_TASKS_TIMEOUT = 5.0


def run_program(main: Awaitable[Any], leftover_timeout: float = LEFTOVER_TASKS_TIMEOUT) -> Any:
    """Like `asyncio.run(main)`, but the clean-up of leftover tasks is bounded in time.

    Tasks that still have not finished `leftover_timeout` seconds after being cancelled are
    logged (name and where they wait) and abandoned, so a shutdown always ends.
    """
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_leftovers(loop, leftover_timeout)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop, timeout: float) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=timeout))
    for task in pending:
        frames = task.get_stack(limit=1)
        where = f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else "?"
        log_event(log, "task_abandoned_at_exit", logging.WARNING, task=task.get_name(), waiting_at=where)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log_event(
                log, "task_failed_at_exit", logging.DEBUG, task=task.get_name(), error=repr(task.exception())
            )
