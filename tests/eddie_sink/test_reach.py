"""A marketplace the sink cannot reach is logged as unreachable at its address, not as a deadline.

The keys fetch waits for the channel to connect and gives up after its deadline: with nothing
listening, grpc calls that DEADLINE_EXCEEDED. A connected but slow marketplace is still a deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from eddie.marketplace.v1 import identity_pb2, identity_pb2_grpc, sink_feed_pb2_grpc
from eddie_common.tokens import SigningKey
from eddie_sink import keys
from tests.eddie_sink.test_ends import SinkFeedDouble
from tests.support.expect import eventually
from tests.support.sink import SigningKeysDouble, free_port, sink_config, start_sink


@pytest.fixture(autouse=True)
def short_fetch_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "FETCH_TIMEOUT_SECONDS", 0.5)


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[Any]:
    return [r for r in caplog.records if r.getMessage() == event]


async def _logged(caplog: pytest.LogCaptureFixture, event: str) -> Any:
    async def seen() -> bool:
        return bool(_events(caplog, event))

    await eventually(seen, 10, f"no {event} logged")
    return _events(caplog, event)[0]


async def test_nothing_listening_is_logged_as_unreachable_at_the_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="eddie_sink")
    address = f"127.0.0.1:{free_port()}"
    sink = await start_sink(sink_config(tmp_path, address), wait_for_keys=False)
    try:
        record = await _logged(caplog, "signing_keys_unavailable")
    finally:
        await sink.close()
    assert record.error.startswith(f"marketplace unreachable at {address}: "), record.error
    assert "DEADLINE_EXCEEDED" not in record.error
    assert record.marketplace == address


class SlowSigningKeys(identity_pb2_grpc.IdentityServiceServicer):
    async def ListSigningKeys(self, request: Any, context: Any) -> identity_pb2.ListSigningKeysResponse:
        await asyncio.sleep(5)
        return identity_pb2.ListSigningKeysResponse()


@pytest.fixture
async def slow_marketplace() -> AsyncIterator[str]:
    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(SlowSigningKeys(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def test_a_connected_marketplace_that_does_not_answer_in_time_is_a_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, slow_marketplace: str
) -> None:
    caplog.set_level(logging.WARNING, logger="eddie_sink")
    sink = await start_sink(sink_config(tmp_path, slow_marketplace), wait_for_keys=False)
    try:
        record = await _logged(caplog, "signing_keys_unavailable")
    finally:
        await sink.close()
    assert record.error == "DEADLINE_EXCEEDED"


async def test_a_feed_whose_marketplace_stops_is_logged_as_unreachable_at_the_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="eddie_sink")
    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(
        SigningKeysDouble([SigningKey.generate()]), server
    )
    sink_feed_pb2_grpc.add_SinkFeedServiceServicer_to_server(SinkFeedDouble(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    sink = await start_sink(sink_config(tmp_path, address))
    try:
        await asyncio.wait_for(sink.app.feed.connected.wait(), 10)
        await server.stop(0)
        record = await _logged(caplog, "permission_end_feed_down")
    finally:
        await sink.close()
    assert record.error.startswith(f"marketplace unreachable at {address}: "), record.error
