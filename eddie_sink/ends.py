"""The sink honours the end of every permission (API.md, DataSinkService).

`PermissionEnds.ensure_live(permission_id)` is the one gate every ingest path
calls for every reading (gRPC `Publish`, the MQTT path): it refuses with
PERMISSION_DENIED, reason PERMISSION_ENDED, once the permission was revoked,
terminated, ended by an account deletion, or its data window is over. The check
is a set lookup and one integer comparison.

Ends come from the marketplace's `SinkFeedService.WatchPermissionEnds` (see
eddie_sink.feed), which the sink follows for every permission it has seen a sink
token of, proving each subscription with that token; the window's end comes from
the token's `permission_end` claim. Both are kept in the sink's database, so the
sink keeps refusing after a restart, and re-subscribes what it still follows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from eddie_common.errors import PermissionDenied
from eddie_common.logging import log_event
from eddie_sink.auth import Publisher
from eddie_sink.store import ReadingStore

__all__ = ["PERMISSION_ENDED", "PermissionEnds"]

log = logging.getLogger(__name__)

PERMISSION_ENDED = "PERMISSION_ENDED"
Subscribe = Callable[[str], None]


class PermissionEnds:
    """Which permissions have ended, when the others end, and which tokens to follow them with."""

    def __init__(self, store: ReadingStore, clock: Callable[[], int] = time.time_ns) -> None:
        self._store = store
        self._clock = clock
        self._ended: set[str] = set()
        self._end_ns: dict[str, int] = {}
        self._tokens: dict[str, str] = {}  # followed, not ended: permission id -> sink token
        # Called with a sink token to follow (the feed's `subscribe`), once per permission.
        self.subscribe: Subscribe = lambda _token: None

    @classmethod
    async def load(cls, store: ReadingStore) -> PermissionEnds:
        """The ends and followed permissions the database remembers."""
        ends = cls(store)
        ends._ended.update(await store.ended_permissions())
        for permission_id, token, end_ns in await store.watches():
            if permission_id in ends._ended:
                continue
            ends._tokens[permission_id] = token
            if end_ns is not None:
                ends._end_ns[permission_id] = end_ns
        return ends

    def ensure_live(self, permission_id: str) -> None:
        """Raises PERMISSION_DENIED (PERMISSION_ENDED) if the permission has ended."""
        if permission_id in self._ended:
            raise _ended(permission_id)
        end = self._end_ns.get(permission_id)
        if end is not None and self._clock() >= end:
            raise _ended(permission_id)

    def is_ended(self, permission_id: str) -> bool:
        return permission_id in self._ended

    def tokens(self) -> list[str]:
        """The sink tokens of every followed permission that has not ended (to re-subscribe)."""
        return list(self._tokens.values())

    async def follow(self, publisher: Publisher) -> None:
        """Follows the end of the publisher's permission from now on (and after restarts)."""
        permission_id = publisher.permission_id
        if publisher.end_ns is not None:
            known = self._end_ns.get(permission_id)
            self._end_ns[permission_id] = publisher.end_ns if known is None else min(known, publisher.end_ns)
        if permission_id in self._ended or permission_id in self._tokens or not publisher.sink_token:
            return
        self._tokens[permission_id] = publisher.sink_token
        await self._store.record_watch(permission_id, publisher.sink_token, self._end_ns.get(permission_id))
        self.subscribe(publisher.sink_token)

    async def mark_ended(self, permission_id: str, state: str) -> None:
        """The permission has ended (as the marketplace says): refused at once, and for good."""
        if permission_id in self._ended:
            return
        self._ended.add(permission_id)  # before the write: refusal must not wait for the disk
        self._tokens.pop(permission_id, None)
        await self._store.record_end(permission_id, state)
        log_event(log, "permission_ended", permission=permission_id, state=state)


def _ended(permission_id: str) -> PermissionDenied:
    return PermissionDenied(
        f"permissions/{permission_id} has ended; its readings are refused",
        reason=PERMISSION_ENDED,
        metadata={"permission_id": permission_id},
    )
