"""The in-process event hub: permission changes and new access requests to live streams.

Each stream (a customer's consent channel, an EP's WatchPermissions) is one
subscriber with a bounded queue. Publishing never waits: a subscriber whose
queue is full is dropped (its stream ends with RESOURCE_EXHAUSTED,
SUBSCRIBER_TOO_SLOW), so one slow client never holds up the others.

A subscriber takes each permission's events in order of its state's `version`
and each version once: a permission's states only move forward (PENDING, then
ACCEPTED, then ACTIVE, then one terminal state; see `ALLOWED` in
services.permissions), so the state is a version. An event that arrives twice
(published, and repaired from the database in cluster mode) or late (after a
newer one) is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from google.protobuf.message import Message

from eddie.marketplace.v1 import access_pb2, data_request_pb2
from eddie_common.logging import log_event
from marketplace_server.clock import utcnow
from marketplace_server.db.models import PermissionState
from marketplace_server.errors import ResourceExhausted, Unavailable

__all__ = [
    "AccessRequested",
    "Event",
    "EventHub",
    "PermissionChanged",
    "Subscriber",
    "accounts_of",
    "version",
]

log = logging.getLogger(__name__)

# Larger than the biggest burst one transaction publishes (RequestAccess of 1,000 instances).
QUEUE_SIZE = 10_000


@dataclass(frozen=True)
class PermissionChanged:
    """A permission after a transition (or its creation, with previous_state UNSPECIFIED)."""

    permission: access_pb2.Permission
    previous_state: PermissionState
    customer_id: str
    eligible_party_id: str
    data_request_id: str


@dataclass(frozen=True)
class AccessRequested:
    """A new pending permission, with what the customer's consent screen shows."""

    permission: access_pb2.Permission
    data_request: data_request_pb2.DataRequest
    customer_id: str


Event = PermissionChanged | AccessRequested
# A stream may also queue its own messages (answers to decisions) behind the events.
Item = Event | Message

_S = access_pb2.Permission
_RANKS = {_S.STATE_UNSPECIFIED: -1, _S.STATE_PENDING: 0, _S.STATE_ACCEPTED: 1, _S.STATE_ACTIVE: 2}
TERMINAL_RANK = 3


def version(event: Event) -> int:
    """The version of the permission an event shows: its state's place in the state machine."""
    return _RANKS.get(event.permission.state, TERMINAL_RANK)


class Subscriber:
    """One live stream's queue of events."""

    MAX_REMEMBERED = 100_000

    def __init__(self, account_id: str, accepts: Callable[[Event], bool], size: int = QUEUE_SIZE) -> None:
        self.account_id = account_id
        self.accepts = accepts
        self.opened_at: datetime = utcnow()
        self.versions: dict[str, int] = {}  # permission name -> version of the last event queued
        self.dropped = False
        self._failure: BaseException | None = None
        self._queue: asyncio.Queue[Item | None] = asyncio.Queue(size)

    def push(self, item: Item) -> bool:
        """Queues `item`; False (and the subscriber is dropped) when the queue is full. An event of a
        permission whose version this stream has already queued (or passed) is skipped."""
        if self.dropped:
            return False
        if isinstance(item, PermissionChanged | AccessRequested) and not self._fresh(item):
            return True
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._drop()
            return False
        return True

    def fresh(self, event: Event) -> bool:
        """Whether `event` is newer than what this stream has queued of its permission."""
        known = self.versions.get(event.permission.name)
        return known is None or known < version(event)

    def _fresh(self, event: Event) -> bool:
        if not self.fresh(event):
            return False
        name = event.permission.name
        if name not in self.versions and len(self.versions) >= self.MAX_REMEMBERED:
            del self.versions[next(iter(self.versions))]  # the oldest permission heard of
        self.versions[name] = version(event)
        return True

    def _drop(self) -> None:
        self.dropped = True
        while not self._queue.empty():  # make room for the end marker
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        """Ends the stream with `error` (e.g. its request reader broke); later items are discarded."""
        if self._failure is None:
            self._failure = error
            self._drop()

    async def next(self) -> Item:
        """The next item; raises RESOURCE_EXHAUSTED (SUBSCRIBER_TOO_SLOW) once dropped."""
        item = await self._queue.get()
        if item is None:
            if self._failure is not None:
                raise self._failure
            raise ResourceExhausted(
                "the stream fell too far behind and was closed; reconnect", reason="SUBSCRIBER_TOO_SLOW"
            )
        return item


class EventHub:
    """Routes events to the streams of the accounts they concern."""

    def __init__(self, max_streams_per_account: int, queue_size: int = QUEUE_SIZE) -> None:
        self.max_streams_per_account = max_streams_per_account
        self.queue_size = queue_size
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._closed = False  # the marketplace is stopping: no new streams
        # Called with every published batch, whoever it concerns (e.g. the sinks' feed of ends).
        self.listeners: list[Callable[[list[Event]], None]] = []

    def stream_count(self, account_id: str) -> int:
        return len(self._subscribers.get(account_id, ()))

    def open_streams(self) -> int:
        """Streams of every account (for the metrics)."""
        return sum(len(subscribers) for subscribers in self._subscribers.values())

    @contextlib.contextmanager
    def subscribe(
        self, account_id: str, accepts: Callable[[Event], bool] = lambda _: True
    ) -> Iterator[Subscriber]:
        """A subscriber for the events of `account_id` for the duration of the block."""
        if self._closed:
            raise _shutting_down()
        subscribers = self._subscribers.setdefault(account_id, set())
        if len(subscribers) >= self.max_streams_per_account:
            raise ResourceExhausted(
                f"at most {self.max_streams_per_account} concurrent streams per account",
                reason="TOO_MANY_STREAMS",
            )
        subscriber = Subscriber(account_id, accepts, self.queue_size)
        subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            subscribers.discard(subscriber)
            if not subscribers:
                self._subscribers.pop(account_id, None)

    def end_streams(self, account_id: str, error: BaseException) -> None:
        """Ends every live stream of the account with `error` (e.g. the account was deleted)."""
        for subscriber in list(self._subscribers.get(account_id, ())):
            subscriber.fail(error)

    def close(self) -> None:
        """Ends every open consent and watch stream (the marketplace is stopping): the clients
        reconnect, to another replica behind a load balancer, instead of waiting out the grace period."""
        self._closed = True
        for subscribers in list(self._subscribers.values()):
            for subscriber in list(subscribers):
                subscriber.fail(_shutting_down())

    def publish(self, events: list[Event]) -> None:
        for listener in self.listeners:
            listener(events)
        for event in events:
            for account_id in accounts_of(event):
                self._deliver(account_id, event)

    def _deliver(self, account_id: str, event: Event, opened_before: datetime | None = None) -> int:
        """Queues `event` on the account's streams (those opened before `opened_before`, if given) that
        accept it and have not had it yet; returns on how many."""
        queued = 0
        for subscriber in list(self._subscribers.get(account_id, ())):
            if opened_before is not None and subscriber.opened_at > opened_before:
                continue
            if not subscriber.accepts(event) or not subscriber.fresh(event):
                continue
            if subscriber.push(event):
                queued += 1
            else:
                self._subscribers.get(account_id, set()).discard(subscriber)
                log_event(log, "subscriber_dropped", logging.WARNING, account=account_id, why="too_slow")
        return queued


def _shutting_down() -> Unavailable:
    return Unavailable("the marketplace is shutting down; reconnect", reason="SHUTTING_DOWN")


def accounts_of(event: Event) -> list[str]:
    """The accounts whose streams an event concerns."""
    if isinstance(event, AccessRequested):
        return [event.customer_id]
    if event.previous_state == access_pb2.Permission.STATE_UNSPECIFIED:
        return [event.eligible_party_id]  # the customer got an AccessRequested
    return [event.customer_id, event.eligible_party_id]
