"""Prometheus metrics shared by the three programs: gRPC calls per method and code, and /metrics.

Each program owns one `CollectorRegistry` (tests run several programs in one process), adds
its own collectors to it, and serves it with `MetricsEndpoint` on `--metrics-listen`. The
endpoint runs on the program's event loop, so collectors read the program's state directly
and `refreshers` may query the database right before a scrape instead of counting per event.
Labels are bounded: gRPC service, method and status code, never an instance or permission id.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from eddie_common.cli import split_host_port
from eddie_common.failures import UsageError
from eddie_common.interceptors import WrapOnceInterceptor
from eddie_common.logging import log_event

log = logging.getLogger(__name__)

# Unary calls take milliseconds; streams (consent, readings, AIIDA links) minutes or hours.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600)
REFRESH_TIMEOUT = 5.0
# Scrapes closer together than this reuse the last refresh: a scraper polling every 50 ms (a
# restart probe, several Prometheus servers) must not turn into a database query every 50 ms.
REFRESH_MIN_INTERVAL = 0.5

Refresher = Callable[[], Awaitable[None]]


class RpcMetrics:
    """grpc_server_* families: calls handled per method and code, latency, calls in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_service", "grpc_method")
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed, by method and status code",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "time from the start of an RPC to its status (streams: their whole life)",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("grpc_server_in_flight", "RPCs in progress (open streams included)", labels,
                               registry=registry)  # fmt: skip
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._handled: dict[tuple[str, str, str], Any] = {}

    def begin(self, method: str) -> tuple[Any, Any, str, str]:
        service, name = _split_method(method)
        children = self._children.get((service, name))
        if children is None:
            children = self._children[(service, name)] = (
                self.seconds.labels(service, name),
                self.in_flight.labels(service, name),
            )
        children[1].inc()
        return children[0], children[1], service, name

    def end(self, started: float, begun: tuple[Any, Any, str, str], code: grpc.StatusCode) -> None:
        seconds, in_flight, service, name = begun
        in_flight.dec()
        seconds.observe(time.perf_counter() - started)
        key = (service, name, code.name)
        counter = self._handled.get(key)
        if counter is None:
            counter = self._handled[key] = self.handled.labels(*key)
        counter.inc()


def _split_method(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _status(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN


class MetricsInterceptor(WrapOnceInterceptor):
    """Measures every RPC but health and reflection; install it first (outermost)."""

    def __init__(self, metrics: RpcMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def wrap(self, handler: Any, method: str) -> Any:
        """`handler` measured: calls in progress, their latency and status."""
        if handler.response_streaming:
            behaviour = handler.unary_stream or handler.stream_stream
            wrapped: Any = self._stream(behaviour, method)
            field = "unary_stream" if handler.unary_stream else "stream_stream"
        else:
            behaviour = handler.unary_unary or handler.stream_unary
            wrapped = self._unary(behaviour, method)
            field = "unary_unary" if handler.unary_unary else "stream_unary"
        return handler._replace(**{field: wrapped})

    def _unary(self, behaviour: Any, method: str) -> Any:
        metrics = self.metrics

        async def call(request: Any, context: Any) -> Any:
            started, begun, error = time.perf_counter(), metrics.begin(method), None
            try:
                return await behaviour(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                metrics.end(started, begun, _status(context, error))

        return call

    def _stream(self, behaviour: Any, method: str) -> Any:
        metrics = self.metrics
        if inspect.iscoroutinefunction(behaviour):  # the reader/writer form: it writes, returns None

            async def respond(request: Any, context: Any) -> None:
                started, begun, error = time.perf_counter(), metrics.begin(method), None
                try:
                    await behaviour(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    metrics.end(started, begun, _status(context, error))

            return respond

        async def call(request: Any, context: Any) -> AsyncIterator[Any]:
            started, begun, error = time.perf_counter(), metrics.begin(method), None
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                metrics.end(started, begun, _status(context, error))

        return call


class MetricsEndpoint:
    """Serves `registry` in the Prometheus text format at /metrics (HTTP/1.1, one request per connection)."""

    def __init__(self, registry: CollectorRegistry, refreshers: Sequence[Refresher] = ()) -> None:
        self.registry = registry
        self.refreshers = list(refreshers)
        self._refreshed_at = float("-inf")
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self, listen: str) -> int:
        """Binds `listen` (port 0 picks a free one) and returns the bound port."""
        host, port = split_host_port(listen)
        try:
            self._server = await asyncio.start_server(self._serve, host.strip("[]"), port)
        except OSError as exc:
            raise UsageError(
                f"--metrics-listen: cannot listen on {listen}: {exc.strerror or exc}",
                "choose --metrics-listen HOST:0 for a free port",
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def render(self) -> bytes:
        """Refreshes the values read at scrape time (at most every REFRESH_MIN_INTERVAL), then
        renders every family."""
        now = time.monotonic()
        if now - self._refreshed_at >= REFRESH_MIN_INTERVAL:
            self._refreshed_at = now
            await self._refresh()
        return generate_latest(self.registry)

    async def _refresh(self) -> None:
        for refresh in self.refreshers:
            try:
                await asyncio.wait_for(refresh(), REFRESH_TIMEOUT)
            except Exception as exc:  # a scrape still answers with what it has
                log_event(log, "metrics_refresh_failed", logging.WARNING, error=type(exc).__name__)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path, *_ = [*request.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
            if method != "GET" or path.split("?")[0] not in ("/metrics", "/metrics/"):
                await _respond(writer, 404, b"not found: GET /metrics\n", "text/plain")
                return
            await _respond(writer, 200, await self.render(), CONTENT_TYPE_LATEST)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str) -> None:
    reason = "OK" if status == 200 else "Not Found"
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    await writer.drain()


def announce_metrics(host: str, port: int) -> None:
    """The line operators and tests read: `metrics on HOST:PORT`."""
    print(f"metrics on {host}:{port}", flush=True)
