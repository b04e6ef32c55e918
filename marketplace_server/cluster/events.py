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
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from eddie.marketplace.v1 import access_pb2, data_request_pb2
from eddie_common.logging import log_event
from marketplace_server.services.events import AccessRequested, Event, EventHub, PermissionChanged

__all__ = ["ClusterEventHub", "Messaging", "decode_event", "encode_event"]

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


def _accounts_of(event: Event) -> list[str]:
    """The accounts whose streams an event concerns (EventHub.publish's routing)."""
    if isinstance(event, AccessRequested):
        return [event.customer_id]
    if event.previous_state == access_pb2.Permission.STATE_UNSPECIFIED:
        return [event.eligible_party_id]
    return [event.customer_id, event.eligible_party_id]


class ClusterEventHub(EventHub):
    """An EventHub whose events also reach (and come from) the other replicas' streams."""

    def __init__(
        self, max_streams_per_account: int, messaging: Messaging, prefix: str, replica_id: str
    ) -> None:
        super().__init__(max_streams_per_account)
        self.messaging = messaging
        self.prefix = prefix
        self.replica_id = replica_id
        self._sending: set[asyncio.Task[None]] = set()
        self.received = 0
        # Called with the id of an account deleted at another replica.
        self.deletion_listeners: list[Callable[[str], None]] = []

    async def start(self) -> None:
        await self.messaging.subscribe(f"{self.prefix}.events.>", cb=self._on_message)
        await self.messaging.subscribe(f"{self.prefix}.accounts.deleted", cb=self._on_deleted)

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
            payload = encode_event(event, self.replica_id)
            for account_id in _accounts_of(event):
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
        if account_id == _accounts_of(event)[0]:
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
