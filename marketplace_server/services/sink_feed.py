"""The feed of permission ends for EP data sinks (SinkFeedService.WatchPermissionEnds).

Why this mechanism: a sink must honour a revocation within a second even while an
AIIDA keeps publishing with a valid sink token, must keep honouring it after its own
restart, and is started with only `--listen --marketplace --data-dir` (no EP
credentials). Short-lived sink tokens would need the AIIDA to renew them (and still
leave a window of their lifetime); following the EP's `WatchPermissions` needs an EP
token. Instead the sink proves each subscription with the one credential it has for a
permission, the permission's sink token: the marketplace verifies the token (its own
signature, audience `eddie-sink`) and pushes the permission's end the moment its state
becomes terminal, or at once if it already is. The sink stores every end it learns.

A token holder learns only whether and when that one permission ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import sink_feed_pb2
from eddie_common.errors import DomainError, ResourceExhausted, Unauthenticated, Unavailable
from eddie_common.logging import log_event
from eddie_common.tokens import TokenVerifier
from marketplace_server.clock import to_timestamp
from marketplace_server.db.models import PermissionRow
from marketplace_server.keyring import LiveKeys
from marketplace_server.services.events import Event, PermissionChanged
from marketplace_server.services.permissions import TERMINAL_STATES

__all__ = ["PermissionEndFeed"]

log = logging.getLogger(__name__)

Response = sink_feed_pb2.WatchPermissionEndsResponse
MAX_SUBSCRIPTIONS = 100_000  # per stream
MAX_INVALID = 100  # invalid tokens a stream may send before it is ended
QUEUE_SIZE = 10_000


class _Watch:
    """One open feed: the permissions it follows and its queue of responses."""

    def __init__(self) -> None:
        self.permission_ids: set[str] = set()
        self.queue: asyncio.Queue[Response | BaseException] = asyncio.Queue(QUEUE_SIZE)
        self.invalid = 0

    def push(self, item: Response | BaseException) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            while not self.queue.empty():  # make room for the end
                self.queue.get_nowait()
            self.queue.put_nowait(
                ResourceExhausted("the feed fell too far behind; reconnect", reason="SUBSCRIBER_TOO_SLOW")
            )


class PermissionEndFeed:
    """Streams the end of each subscribed permission; fed by the event hub after every commit."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        verifier: TokenVerifier,
        keys: LiveKeys | None = None,
    ) -> None:
        self.sessions = sessions
        self.verifier = verifier
        self.keys = keys  # the ring the verifier follows (a sink token signed at another replica)
        self._watches: dict[str, set[_Watch]] = {}  # permission id -> feeds following it
        self._open: set[_Watch] = set()

    def close(self) -> None:
        """Ends every open feed (the marketplace is stopping; sinks reconnect and re-subscribe)."""
        ending = Unavailable("the marketplace is shutting down; reconnect", reason="SHUTTING_DOWN")
        for watch in {w for watches in self._watches.values() for w in watches} | self._open:
            watch.push(ending)

    def on_events(self, events: list[Event]) -> None:
        """The hub's listener: pushes every permission that just became terminal to its followers."""
        for event in events:
            if not isinstance(event, PermissionChanged) or event.permission.state not in TERMINAL_STATES:
                continue
            permission_id = event.permission.name.removeprefix("permissions/")
            watches = self._watches.get(permission_id)
            if not watches:
                continue
            response = Response(
                permission_id=permission_id,
                ended=True,
                state=event.permission.state,
                end_time=event.permission.end_time if event.permission.HasField("end_time") else None,
            )
            for watch in list(watches):
                watch.push(response)

    async def watch(
        self, requests: AsyncIterator[sink_feed_pb2.WatchPermissionEndsRequest]
    ) -> AsyncIterator[Response]:
        feed = _Watch()
        self._open.add(feed)
        reader = asyncio.create_task(self._read(requests, feed))
        try:
            while True:
                item = await feed.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            self._open.discard(feed)
            for permission_id in feed.permission_ids:
                watches = self._watches.get(permission_id)
                if watches is not None:
                    watches.discard(feed)
                    if not watches:
                        del self._watches[permission_id]

    async def _read(
        self, requests: AsyncIterator[sink_feed_pb2.WatchPermissionEndsRequest], feed: _Watch
    ) -> None:
        try:
            async for request in requests:
                await self._subscribe(feed, request.sink_token)
        except asyncio.CancelledError:
            raise
        except DomainError as exc:
            feed.push(exc)
        except Exception as exc:  # the request stream broke: the feed ends with it
            log_event(log, "sink_feed_read_failed", logging.DEBUG, error=type(exc).__name__)
            feed.push(Unauthenticated("the feed's request stream failed", reason="TOKEN_INVALID"))

    async def _subscribe(self, feed: _Watch, token: str) -> None:
        permission_id = await self._permission_of(token)
        if permission_id is None:
            feed.invalid += 1
            if feed.invalid > MAX_INVALID:
                raise Unauthenticated("too many invalid sink tokens", reason="TOKEN_INVALID")
            return
        if permission_id in feed.permission_ids:
            return
        if len(feed.permission_ids) >= MAX_SUBSCRIPTIONS:
            raise ResourceExhausted(
                f"at most {MAX_SUBSCRIPTIONS:,} permissions per feed", reason="TOO_MANY_SUBSCRIPTIONS"
            )
        # Registered before the state is read, so an end committed in between is not missed.
        feed.permission_ids.add(permission_id)
        self._watches.setdefault(permission_id, set()).add(feed)
        async with self.sessions() as session:
            row = (
                await session.execute(
                    select(PermissionRow.state, PermissionRow.end_time).where(
                        PermissionRow.id == permission_id
                    )
                )
            ).first()
        if row is None:
            return
        state, end_time = int(row[0]), row[1]
        feed.push(
            Response(
                permission_id=permission_id,
                ended=state in TERMINAL_STATES,
                state=state,  # type: ignore[arg-type]
                end_time=to_timestamp(end_time) if end_time is not None else None,
            )
        )

    async def _permission_of(self, token: str) -> str | None:
        """The permission a valid sink token names, or None."""
        if not token or len(token) > 4096:
            return None
        try:
            if self.keys is not None:
                claims: dict[str, Any] = await self.keys.verify(self.verifier, token)
            else:
                claims = self.verifier.verify(token)
        except Unauthenticated:
            return None
        permission_id = claims.get("permission_id")
        if not isinstance(permission_id, str) or claims.get("sub") != f"permissions/{permission_id}":
            return None
        return permission_id
