"""Permission events across replicas: the event hub, bridged over NATS.

A customer's consent stream or an EP's WatchPermissions may be held by any
replica, while the change happens at another. After its commit, a replica
delivers the transaction's events to its own streams (as in one process) and
publishes them on `{prefix}.events.{account_id}` for each account concerned;
every replica follows `{prefix}.events.>` and delivers what other replicas
published to the streams it holds. The database stays the truth: a stream that
(re)connects starts from a snapshot read after it subscribed.

A deleted account is announced on `{prefix}.accounts.deleted` (after the commit, before
DeleteAccount returns): every other replica refuses its access tokens from then on and
ends its streams, without waiting for its authentication cache's window.

Core NATS is at most once, so a publish can be lost (a broken connection, a
slow consumer). `ClusterEventHub.repair` catches the open streams up from the
database while they stay connected: every `--event-repair-interval` seconds each
replica reads the permissions of the accounts it holds streams for that changed
in the last `REPAIR_LOOKBACK` seconds and queues, as events, the states a stream
has not had yet. Streams take each permission's versions in order and once
(`Subscriber`), so a repaired event never reaches a client twice, and the
normal path (publish after commit) is untouched.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import access_pb2, data_request_pb2
from eddie_common.logging import log_event
from marketplace_server.clock import utcnow
from marketplace_server.db.models import PermissionRow, PermissionTransitionRow
from marketplace_server.resources import load_data_requests, permission_to_proto
from marketplace_server.services.events import (
    AccessRequested,
    Event,
    EventHub,
    PermissionChanged,
    accounts_of,
)

__all__ = ["ClusterEventHub", "Messaging", "decode_event", "encode_event"]

REPAIR_SECONDS = 2.0
# How far back a repair round looks: longer than a transaction may take from its permission's
# update_time (the writer's clock) to its commit, plus the replicas' clock skew.
REPAIR_LOOKBACK = timedelta(seconds=30)
# A stream opened this long after a change may still miss its event (the change committed after the
# stream's snapshot, its publish was lost); one opened later has the change in its snapshot.
REPAIR_OPEN_MARGIN = timedelta(seconds=5)
REPAIR_ACCOUNTS_PER_QUERY = 500

log = logging.getLogger(__name__)


class Messaging(Protocol):
    """What the hub needs of a NATS connection (nats.aio.client.Client has it)."""

    async def publish(self, subject: str, payload: bytes = b"") -> None: ...

    async def subscribe(self, subject: str, cb: Any = None) -> Any: ...

    async def flush(self, timeout: int = ...) -> None: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode_event(event: Event, origin: str) -> bytes:
    body: dict[str, Any] = {"origin": origin, "permission": _b64(event.permission.SerializeToString())}
    if isinstance(event, AccessRequested):
        body |= {
            "kind": "access_requested",
            "customer_id": event.customer_id,
            "data_request": _b64(event.data_request.SerializeToString()),
        }
    else:
        body |= {
            "kind": "permission_changed",
            "previous_state": event.previous_state,
            "customer_id": event.customer_id,
            "eligible_party_id": event.eligible_party_id,
            "data_request_id": event.data_request_id,
        }
    return json.dumps(body, separators=(",", ":")).encode()


def decode_event(payload: bytes) -> tuple[str, Event]:
    """(origin replica, event); ValueError on anything malformed."""
    try:
        body = json.loads(payload)
        permission = access_pb2.Permission.FromString(base64.b64decode(body["permission"]))
        if body["kind"] == "access_requested":
            data_request = data_request_pb2.DataRequest.FromString(base64.b64decode(body["data_request"]))
            return str(body["origin"]), AccessRequested(permission, data_request, str(body["customer_id"]))
        if body["kind"] == "permission_changed":
            return str(body["origin"]), PermissionChanged(
                permission=permission,
                previous_state=access_pb2.Permission.State.ValueType(int(body["previous_state"])),
                customer_id=str(body["customer_id"]),
                eligible_party_id=str(body["eligible_party_id"]),
                data_request_id=str(body["data_request_id"]),
            )
    except Exception as exc:
        raise ValueError(f"malformed cluster event: {type(exc).__name__}") from None
    raise ValueError("malformed cluster event: unknown kind")


class ClusterEventHub(EventHub):
    """An EventHub whose events also reach (and come from) the other replicas' streams."""

    def __init__(
        self,
        max_streams_per_account: int,
        messaging: Messaging,
        prefix: str,
        replica_id: str,
        sessions: async_sessionmaker[AsyncSession] | None = None,
        repair_seconds: float = REPAIR_SECONDS,
    ) -> None:
        super().__init__(max_streams_per_account)
        self.messaging = messaging
        self.prefix = prefix
        self.replica_id = replica_id
        self.sessions = sessions
        self.repair_seconds = repair_seconds
        self._sending: set[asyncio.Task[None]] = set()
        self._repairing: asyncio.Task[None] | None = None
        self.received = 0
        # Called with the id of an account deleted at another replica.
        self.deletion_listeners: list[Callable[[str], None]] = []
        self.repaired = 0  # events queued on streams by a repair (their publish was lost)
        self.on_repaired: list[Callable[[int], None]] = []  # the metrics
        # Tests: returns False for an event whose publish is to be lost on purpose.
        self.publish_filter: Callable[[Event], bool] = lambda _: True

    async def start(self) -> None:
        await self.messaging.subscribe(f"{self.prefix}.events.>", cb=self._on_message)
        await self.messaging.subscribe(f"{self.prefix}.accounts.deleted", cb=self._on_deleted)
        if self.sessions is not None and self.repair_seconds > 0:
            self._repairing = asyncio.create_task(self._repair_forever(), name="event-repair")

    async def stop(self) -> None:
        if self._repairing is not None:
            self._repairing.cancel()
            await asyncio.gather(self._repairing, return_exceptions=True)
            self._repairing = None

    async def announce_deleted(self, account_id: str) -> None:
        """Tells the other replicas (handed to the NATS server before this returns)."""
        body = {"origin": self.replica_id, "id": account_id}
        await self.messaging.publish(
            f"{self.prefix}.accounts.deleted", json.dumps(body, separators=(",", ":")).encode()
        )
        await self.messaging.flush(timeout=2)

    async def _on_deleted(self, message: Any) -> None:
        try:
            body = json.loads(message.data)
            origin, account_id = str(body["origin"]), str(body["id"])
        except (ValueError, KeyError, TypeError) as exc:
            log_event(log, "cluster_message_dropped", logging.WARNING, error=repr(exc)[:200])
            return
        if origin == self.replica_id:
            return
        for listener in self.deletion_listeners:
            listener(account_id)

    def publish(self, events: list[Event]) -> None:
        super().publish(events)
        if events:
            task = asyncio.create_task(self._forward(events))
            self._sending.add(task)  # kept until done: no task without a reference
            task.add_done_callback(self._sending.discard)

    async def _forward(self, events: list[Event]) -> None:
        for event in events:
            if not self.publish_filter(event):
                continue
            payload = encode_event(event, self.replica_id)
            for account_id in accounts_of(event):
                try:
                    await self.messaging.publish(f"{self.prefix}.events.{account_id}", payload)
                except Exception as exc:  # streams elsewhere catch up from the database when they reconnect
                    log_event(log, "cluster_event_publish_failed", logging.WARNING, error=repr(exc)[:200])

    async def _on_message(self, message: Any) -> None:
        try:
            origin, event = decode_event(message.data)
        except ValueError as exc:
            log_event(log, "cluster_event_dropped", logging.WARNING, error=str(exc))
            return
        if origin == self.replica_id:
            return  # delivered locally already
        account_id = str(message.subject).rsplit(".", 1)[-1]
        if account_id == accounts_of(event)[0]:
            # Once per event (it is published once per account concerned): the hub's listeners, such
            # as the sinks' feed of permission ends, hear of changes made at other replicas too.
            for listener in self.listeners:
                listener([event])
        if account_id in self._subscribers:
            self.received += 1
            self._deliver(account_id, event)

    async def flush(self) -> None:
        """Waits until the events published so far have been handed to NATS."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    # --- repair from the database ---

    async def _repair_forever(self) -> None:
        while True:
            await asyncio.sleep(self.repair_seconds)
            try:
                await self.repair()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again
                log_event(log, "cluster_event_repair_failed", logging.WARNING, error=repr(exc)[:200])

    async def repair(self) -> int:
        """One round: queues on the streams held here the permission states they have not had yet
        (changed in the last REPAIR_LOOKBACK); returns how many events it queued."""
        assert self.sessions is not None
        accounts = sorted(self._subscribers)
        if not accounts:
            return 0
        since = utcnow() - REPAIR_LOOKBACK
        queued = 0
        for start in range(0, len(accounts), REPAIR_ACCOUNTS_PER_QUERY):
            chunk = accounts[start : start + REPAIR_ACCOUNTS_PER_QUERY]
            for event in await self._changes(chunk, since):
                for account_id in accounts_of(event):
                    if account_id in self._subscribers:
                        update_time = event.permission.update_time.ToDatetime(tzinfo=since.tzinfo)
                        queued += self._deliver(account_id, event, update_time + REPAIR_OPEN_MARGIN)
        if queued:
            self.repaired += queued
            for listener in self.on_repaired:
                listener(queued)
            log_event(log, "cluster_events_repaired", logging.WARNING, replica=self.replica_id, events=queued)
        return queued

    async def _changes(self, accounts: list[str], since: Any) -> list[Event]:
        """The latest event of every permission of `accounts` changed since `since`, from the database."""
        assert self.sessions is not None
        async with self.sessions() as session:
            rows = list(
                await session.scalars(
                    select(PermissionRow)
                    .where(
                        PermissionRow.update_time > since,
                        or_(
                            PermissionRow.customer_id.in_(accounts),
                            PermissionRow.eligible_party_id.in_(accounts),
                        ),
                    )
                    .order_by(PermissionRow.seq)
                )
            )
            if not rows:
                return []
            pending = [r for r in rows if r.state == access_pb2.Permission.STATE_PENDING]
            data_requests = await load_data_requests(session, {r.data_request_id for r in pending})
            moved = [r.id for r in rows if r.state != access_pb2.Permission.STATE_PENDING]
            previous: dict[tuple[str, int], int] = {}
            if moved:
                transitions = await session.execute(
                    select(
                        PermissionTransitionRow.permission_id,
                        PermissionTransitionRow.from_state,
                        PermissionTransitionRow.to_state,
                    ).where(PermissionTransitionRow.permission_id.in_(moved))
                )
                previous = {(p, int(to)): int(frm) for p, frm, to in transitions.all()}
        events: list[Event] = []
        for row in rows:
            permission = permission_to_proto(row)
            common = (row.customer_id, row.eligible_party_id, row.data_request_id)
            if row.state == access_pb2.Permission.STATE_PENDING:
                data_request = data_requests.get(row.data_request_id)
                if data_request is not None:
                    events.append(AccessRequested(permission, data_request, row.customer_id))
                events.append(PermissionChanged(permission, access_pb2.Permission.STATE_UNSPECIFIED, *common))
            else:
                before = previous.get((row.id, int(row.state)), access_pb2.Permission.STATE_PENDING)
                events.append(
                    PermissionChanged(permission, access_pb2.Permission.State.ValueType(before), *common)
                )
        return events
