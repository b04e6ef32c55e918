"""The shared metrics parts: the gRPC interceptor counts calls per method and code; /metrics answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge

from eddie_common.failures import UsageError
from eddie_common.metrics import MetricsEndpoint, MetricsInterceptor, RpcMetrics


async def _say(request: bytes, context: Any) -> bytes:
    if request == b"bad":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    return request


async def _count(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


@pytest.fixture
async def served() -> AsyncIterator[tuple[CollectorRegistry, grpc.aio.Channel]]:
    registry = CollectorRegistry()
    server = grpc.aio.server(interceptors=[MetricsInterceptor(RpcMetrics(registry))])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Say": grpc.unary_unary_rpc_method_handler(_say),
                    "Count": grpc.unary_stream_rpc_method_handler(_count),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield registry, channel
    await channel.close()
    await server.stop(0)


async def test_calls_are_counted_per_method_and_code(
    served: tuple[CollectorRegistry, grpc.aio.Channel],
) -> None:
    registry, channel = served
    say = channel.unary_unary("/test.Echo/Say")
    count = channel.unary_stream("/test.Echo/Count")
    assert await say(b"hi") == b"hi"
    assert await say(b"ho") == b"ho"
    with pytest.raises(grpc.aio.AioRpcError):
        await say(b"bad")
    assert [r async for r in count(b"3")] == [b"0", b"1", b"2"]
    labels = {"grpc_service": "test.Echo", "grpc_method": "Say"}
    assert registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 2
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "INVALID_ARGUMENT"})
        == 1
    )
    assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 3
    assert registry.get_sample_value("grpc_server_in_flight", labels) == 0
    streamed = {"grpc_service": "test.Echo", "grpc_method": "Count", "grpc_code": "OK"}
    assert registry.get_sample_value("grpc_server_handled_total", streamed) == 1


async def _get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return head.split("\r\n")[0], body


async def test_endpoint_serves_metrics_after_refreshing_and_survives_a_failing_refresher() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("example_value", "an example", registry=registry)

    async def refresh() -> None:
        gauge.set(42)

    async def broken() -> None:
        raise RuntimeError("database away")

    endpoint = MetricsEndpoint(registry, [broken, refresh])
    port = await endpoint.start("127.0.0.1:0")
    try:
        status, body = await _get(port, "/metrics")
        assert status == "HTTP/1.1 200 OK"
        assert "example_value 42.0" in body
        status, _ = await _get(port, "/")
        assert status == "HTTP/1.1 404 Not Found"
        with pytest.raises(UsageError, match="--metrics-listen: cannot listen on"):
            await MetricsEndpoint(registry).start(f"127.0.0.1:{port}")
    finally:
        await endpoint.stop()


async def test_scrapes_closer_than_the_minimum_interval_reuse_the_last_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scraper polling every 50 ms costs the database one refresh per interval, not one per scrape."""
    registry = CollectorRegistry()
    gauge = Gauge("refreshed_total_value", "times refreshed", registry=registry)
    calls = 0

    async def refresh() -> None:
        nonlocal calls
        calls += 1
        gauge.set(calls)

    monkeypatch.setattr("eddie_common.metrics.REFRESH_MIN_INTERVAL", 0.3)
    endpoint = MetricsEndpoint(registry, [refresh])
    first = await endpoint.render()
    second = await endpoint.render()
    assert calls == 1 and b"refreshed_total_value 1.0" in first and b"refreshed_total_value 1.0" in second
    await asyncio.sleep(0.35)
    third = await endpoint.render()
    assert calls == 2 and b"refreshed_total_value 2.0" in third
