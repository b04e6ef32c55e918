"""Following the marketplace's feed of permission ends (SinkFeedService.WatchPermissionEnds).

One long-lived stream: the sink sends the sink token of every permission it
follows (all of them again after each reconnect) and marks each permission the
marketplace reports ended in `PermissionEnds`. The stream is retried with
backoff for as long as the sink runs; what ended while it was down is reported
at once on re-subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from eddie.marketplace.v1 import access_pb2, sink_feed_pb2, sink_feed_pb2_grpc
from eddie_common.logging import log_event
from eddie_common.retry import Backoff, retry_log_level
from eddie_sink.ends import PermissionEnds
from eddie_sink.reach import describe_failure

__all__ = ["EndFeed"]

log = logging.getLogger(__name__)

_BACKOFF = Backoff(initial=0.1, cap=5.0)
Request = sink_feed_pb2.WatchPermissionEndsRequest


class EndFeed:
    """Keeps the sink subscribed to the end of every permission it follows."""

    def __init__(self, channel: grpc.aio.Channel, target: str, ends: PermissionEnds) -> None:
        """`channel` to the marketplace at `target` (named in the logs); its owner closes it."""
        self.target = target
        self.ends = ends
        self._channel = channel
        self._stub = sink_feed_pb2_grpc.SinkFeedServiceStub(channel)
        self._outgoing: asyncio.Queue[str] | None = None  # tokens for the current stream
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # set while a stream is open (for tests and health)
        ends.subscribe = self.subscribe

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="permission-end-feed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(self, sink_token: str) -> None:
        """Follows one more permission (sent at once if the stream is up, else on reconnect)."""
        if self._outgoing is not None:
            self._outgoing.put_nowait(sink_token)

    async def _run(self) -> None:
        attempt = 0
        while True:
            # No await between the snapshot and installing the queue: a `follow` cannot fall between.
            outgoing: asyncio.Queue[str] = asyncio.Queue()
            for token in self.ends.tokens():
                outgoing.put_nowait(token)
            self._outgoing = outgoing
            try:
                await self._follow(outgoing)
                error = "the marketplace ended the feed"
            except grpc.aio.AioRpcError as exc:
                error = describe_failure(exc, self._channel, self.target)
            finally:
                self._outgoing = None
                if self.connected.is_set():  # it was up: start the backoff over
                    attempt = 0
                self.connected.clear()
            attempt += 1
            delay = _BACKOFF.delay(attempt)
            log_event(
                log,
                "permission_end_feed_down",
                retry_log_level(attempt),
                marketplace=self.target,
                error=error,
                retry_in=f"{delay:.2f}s",
            )
            await asyncio.sleep(delay)

    async def _follow(self, outgoing: asyncio.Queue[str]) -> None:
        """Runs one stream until it ends."""
        call = self._stub.WatchPermissionEnds(_requests(outgoing), wait_for_ready=True)
        try:
            await call.wait_for_connection()
            self.connected.set()
            log_event(log, "permission_end_feed_up", marketplace=self.target, following=outgoing.qsize())
            async for response in call:
                if response.ended and response.permission_id:
                    await self.ends.mark_ended(response.permission_id, _state_name(response.state))
        finally:
            call.cancel()


def _state_name(state: int) -> str:
    states = access_pb2.Permission.State
    return states.Name(state) if state in states.values() else str(state)  # type: ignore[arg-type]


async def _requests(outgoing: asyncio.Queue[str]) -> AsyncIterator[Request]:
    while True:
        yield Request(sink_token=await outgoing.get())
