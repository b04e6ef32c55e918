"""The sink honours every end (API.md, DataSinkService): the permission's end time, and the ends the
marketplace's feed reports, at once on open streams, for good, and after a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from eddie.framework.v1 import data_sink_pb2
from eddie.marketplace.v1 import access_pb2, identity_pb2_grpc, sink_feed_pb2, sink_feed_pb2_grpc
from eddie_common import tokens
from eddie_common.interceptors import error_info
from tests.support.expect import eventually
from tests.support.sink import (
    ISSUER,
    PERMISSION,
    FakeMarketplace,
    RunningSink,
    SigningKeysDouble,
    bearer,
    reading,
    sink_config,
    start_sink,
)

Response = sink_feed_pb2.WatchPermissionEndsResponse


class SinkFeedDouble(sink_feed_pb2_grpc.SinkFeedServiceServicer):
    """The marketplace's feed of ends: records subscriptions, reports an end when told."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self._streams: list[asyncio.Queue[Response]] = []

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def WatchPermissionEnds(self, request_iterator: Any, context: Any) -> AsyncIterator[Response]:  # type: ignore[override]
        queue: asyncio.Queue[Response] = asyncio.Queue()
        self._streams.append(queue)

        async def read() -> None:
            async for request in request_iterator:
                self.tokens.append(request.sink_token)

        reader = asyncio.create_task(read())
        try:
            await context.send_initial_metadata(())
            while True:
                yield await queue.get()
        finally:
            reader.cancel()
            self._streams.remove(queue)

    def end(self, permission_id: str) -> None:
        for queue in self._streams:
            queue.put_nowait(
                Response(permission_id=permission_id, ended=True, state=access_pb2.Permission.STATE_REVOKED)
            )


@pytest.fixture
async def marketplace() -> AsyncIterator[tuple[FakeMarketplace, SinkFeedDouble]]:
    key = tokens.SigningKey.generate()
    identity, feed = SigningKeysDouble([key]), SinkFeedDouble()
    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(identity, server)
    sink_feed_pb2_grpc.add_SinkFeedServiceServicer_to_server(feed, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield FakeMarketplace(server, port, identity, tokens.TokenIssuer(key, issuer=ISSUER)), feed
    await server.stop(0)


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def _assert_ended(error: grpc.aio.AioRpcError) -> None:
    info = error_info(error)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert info is not None and (info.reason, info.domain) == ("PERMISSION_ENDED", "framework.eddie")


async def _stored(sink: RunningSink, fake: FakeMarketplace, permission_id: str = PERMISSION) -> int:
    try:
        return len(await sink.list_all(fake.access_token(), permission_id))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: nothing of it stored
            raise
        return 0


async def test_readings_after_the_end_time_in_the_sink_token_are_refused(
    tmp_path: Path, marketplace: tuple[FakeMarketplace, SinkFeedDouble]
) -> None:
    fake, _ = marketplace
    sink = await start_sink(sink_config(tmp_path, fake.address))
    try:
        live = fake.sink_token(permission_end=int(time.time()) + 3600)
        assert await sink.publish(live, [reading(1)]) == 1
        over = fake.sink_token("perm-over", permission_end=int(time.time()) - 1)
        _assert_ended(await _refused(sink.publish(over, [reading(1, permission_id="perm-over")])))
        assert await _stored(sink, fake, "perm-over") == 0
    finally:
        await sink.close()


async def test_an_end_reported_by_the_feed_refuses_the_open_stream_and_survives_a_restart(
    tmp_path: Path, marketplace: tuple[FakeMarketplace, SinkFeedDouble]
) -> None:
    fake, feed = marketplace
    ended_token, live_token = fake.sink_token(), fake.sink_token("perm-2")
    config = sink_config(tmp_path, fake.address)
    sink = await start_sink(config)
    try:
        assert await sink.publish(live_token, [reading(1, permission_id="perm-2")]) == 1
        call = sink.stub.Publish(metadata=bearer(ended_token), timeout=10)
        await call.write(data_sink_pb2.PublishRequest(reading=reading(1)))
        await eventually(lambda: _async(ended_token in feed.tokens), 5, "the sink subscribed")
        await eventually(lambda: _stored(sink, fake), 5, "the reading before the end is stored")

        feed.end(PERMISSION)
        await eventually(lambda: _async(sink.app.ends.is_ended(PERMISSION)), 1.0, "the end is applied")
        await _keep_publishing(call)
        _assert_ended(await _refused(call))
        _assert_ended(await _refused(sink.publish(ended_token, [reading(9)])))
        assert await _stored(sink, fake) == 1
    finally:
        await sink.close()

    # Restarted with the same database: still refused, though the feed says nothing this time;
    # the permission that is still live is followed again.
    subscribed = len(feed.tokens)
    sink = await start_sink(config)
    try:
        _assert_ended(await _refused(sink.publish(ended_token, [reading(10)])))
        assert await sink.publish(live_token, [reading(2, permission_id="perm-2")]) == 1
        await eventually(lambda: _async(live_token in feed.tokens[subscribed:]), 5, "re-subscribed")
        assert ended_token not in feed.tokens[subscribed:]
        assert await _stored(sink, fake) == 1
    finally:
        await sink.close()


async def _keep_publishing(call: Any) -> None:
    """A hostile stream writes on until the sink has ended it."""
    try:
        for seconds in range(2, 5):
            await call.write(data_sink_pb2.PublishRequest(reading=reading(seconds)))
            await asyncio.sleep(0.05)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass


async def _async(value: bool) -> bool:
    return value
