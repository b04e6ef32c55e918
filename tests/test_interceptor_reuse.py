"""The interceptors wrap a method's handler once, not on every call (a cost on every RPC and every
AIIDA stream opened after a restart), and rewrap when the server hands them another handler."""

from __future__ import annotations

from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from eddie_common.interceptors import ServiceInterceptor
from eddie_common.metrics import MetricsInterceptor, RpcMetrics


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def _echo(request: Any, context: Any) -> Any:
    return request


async def test_each_method_is_wrapped_once_and_rewrapped_for_a_new_handler() -> None:
    first = grpc.unary_unary_rpc_method_handler(_echo)
    second = grpc.unary_unary_rpc_method_handler(_echo)
    current = first

    async def continuation(details: Any) -> Any:
        return current

    service = ServiceInterceptor(domain="test.example")
    metrics = MetricsInterceptor(RpcMetrics(CollectorRegistry()))

    async def through_both(method: str) -> Any:
        async def inner(details: Any) -> Any:
            return await service.intercept_service(continuation, details)

        return await metrics.intercept_service(inner, _Details(method))

    a = await through_both("/t.S/A")
    assert a is await through_both("/t.S/A")
    assert a is not first and a.unary_unary is not _echo
    b = await through_both("/t.S/B")
    assert b is not a
    current = second
    assert await through_both("/t.S/A") is not a
