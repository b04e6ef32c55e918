"""SinkFeedService servicer: thin; the feed is in services.sink_feed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from eddie.marketplace.v1 import sink_feed_pb2, sink_feed_pb2_grpc
from marketplace_server.services.sink_feed import PermissionEndFeed

Context = grpc.aio.ServicerContext[Any, Any]


class SinkFeedServicer(sink_feed_pb2_grpc.SinkFeedServiceServicer):
    def __init__(self, feed: PermissionEndFeed) -> None:
        self.feed = feed

    async def WatchPermissionEnds(  # type: ignore[override]
        self, request_iterator: AsyncIterator[sink_feed_pb2.WatchPermissionEndsRequest], context: Context
    ) -> AsyncIterator[sink_feed_pb2.WatchPermissionEndsResponse]:
        await context.send_initial_metadata(())  # the sink learns at once that its feed is up
        async for response in self.feed.watch(request_iterator):
            yield response
