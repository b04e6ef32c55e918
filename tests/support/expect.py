"""Assertion helpers: a call fails with a gRPC error as the contract says; a condition is eventually met."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from eddie_common.interceptors import bad_request, error_info


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None, field: str | None = None
) -> grpc.aio.AioRpcError:
    """Awaits `call`, asserting it fails with `code` (and ErrorInfo `reason`, BadRequest `field`)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = caught.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    info = error_info(err)
    assert info is not None, "error has no ErrorInfo detail"
    assert info.domain in ("marketplace.eddie", "aiida.eddie", "framework.eddie")
    if reason is not None:
        assert info.reason == reason, f"expected reason {reason}, got {info.reason}"
    if field is not None:
        bad = bad_request(err)
        assert bad is not None and field in [v.field for v in bad.field_violations], (
            f"no violation for {field}: {bad}"
        )
    assert "Traceback" not in (err.details() or "")
    return err


async def eventually(
    predicate: Callable[[], Awaitable[Any] | Any], timeout: float, what: str = "condition", step: float = 0.05
) -> Any:
    """Polls `predicate` (async, or a plain function) until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {what}"
        await asyncio.sleep(step)
