"""One replica's part in a cluster: NATS, its bucket leases, its streams, and search serving.

Wiring (`create_server` with `--nats-url`):

- the `LeaseKeeper` decides which buckets this replica owns; the connection
  manager holds Connect streams only for claimed instances in those buckets
  (`owns`). Acquiring a bucket loads its claimed instances from the database and
  links them; losing one stops their streams at once (fencing);
- a claim or re-registration served here for an instance another replica owns
  is published on `{prefix}.instances`; the owner links (or readdresses) it. A
  periodic resync from the database repairs a missed message;
- outbox rows are delivered by the owner only (`OutboxWorker.local_instances`);
  rows committed here for another replica's instance wake the owners' workers;
- `{prefix}.search.{replica}` serves the owner's side of a cluster search
  (`marketplace_server.cluster.search`): the local fan-out over the requested
  buckets it owns under the given tokens, `matches` batches, one tally per bucket;
- `{prefix}.rebalance`: a replica that joined, is leaving (SIGTERM: it released
  its leases first), released buckets above its share or expired a gone
  replica's leases says so, and the others run a lease round at once instead of
  at their next renewal;
- a search whose scatter to an owner got "no responders" from NATS (no one
  subscribes to `{prefix}.search.{owner}`: its process died, NATS closed its
  connection) tells the node, which expires that owner's leases and heartbeat
  (`LeaseKeeper.expire_replica`, at most once per owner per lease period) and
  announces it: its buckets move at once, not when its leases expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Collection
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.energy.v1 import energy_pb2
from eddie_common.errors import Unavailable
from eddie_common.logging import log_event
from marketplace_server.aiida.fanout import SearchUpdate
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.aiida.outbox import OutboxWorker
from marketplace_server.cluster.leases import LeaseKeeper, bucket_of
from marketplace_server.cluster.search import BucketSnapshot, BucketTally, Fail, gather
from marketplace_server.db.buckets import BUCKETS
from marketplace_server.db.instances import claimed_instances
from marketplace_server.db.models import BucketClaimRow, BucketLeaseRow, OutboxRow

__all__ = ["ClusterNode", "ClusterUnavailable", "NatsSignals", "connect_nats"]

log = logging.getLogger(__name__)

RESYNC_SECONDS = 15.0
CONNECT_SECONDS = 5.0
# The owner ends its part a little before the coordinator's deadline, so its tallies arrive in time.
OWNER_DEADLINE_SHARE = 0.85
# After this replica's NATS connection came (back) up, "no responders" for another replica is not
# acted on for this long: after a NATS server restart the others may not have resubscribed yet.
SUSPECT_AFTER_CONNECT_SECONDS = 2.0
# A search's reply inbox: messages (and bytes) nats-py may hold for it before it drops them (a slow
# consumer, which fails the search). A search of N instances brings at most one tally per bucket (256)
# plus the owners' match batches; 64 MiB holds the ids of a million matches (~45 bytes each in JSON)
# even if the coordinator read none of them meanwhile.
INBOX_PENDING_MSGS = 65_536
INBOX_PENDING_BYTES = 64 * 1024 * 1024


class ClusterUnavailable(OSError):
    """NATS could not be reached at start-up (one line for the operator)."""


class NatsSignals:
    """What the NATS connection reports, for whoever cares (the node's searches)."""

    def __init__(self) -> None:
        self.slow_consumer: list[Callable[[Any], None]] = []  # with the SlowConsumerError
        self.disconnected: list[Callable[[], None]] = []
        self.reconnected: list[Callable[[], None]] = []

    async def on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError

        if isinstance(exc, SlowConsumerError):
            for listener in self.slow_consumer:
                listener(exc)
            return
        log_event(log, "nats_error", logging.ERROR, error=repr(exc)[:200])

    async def on_disconnected(self) -> None:
        log_event(log, "nats_disconnected", logging.WARNING)
        for listener in self.disconnected:
            listener()

    async def on_reconnected(self) -> None:
        log_event(log, "nats_reconnected")
        for listener in self.reconnected:
            listener()


async def connect_nats(url: str, name: str, signals: NatsSignals | None = None) -> Any:
    """A NATS connection that reconnects forever once up; fails fast if the server is down now."""
    import nats

    signals = signals or NatsSignals()

    try:
        async with asyncio.timeout(CONNECT_SECONDS):
            return await nats.connect(
                url,
                name=name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=signals.on_error,
                disconnected_cb=signals.on_disconnected,
                reconnected_cb=signals.on_reconnected,
            )
    except Exception as exc:
        raise ClusterUnavailable(
            f"NATS at {url} is unreachable ({type(exc).__name__}) — check --nats-url"
        ) from None


class ClusterNode:
    """This replica's leases, its share of the streams, and its side of cluster searches."""

    def __init__(
        self,
        nc: Any,
        leases: LeaseKeeper,
        sessions: async_sessionmaker[AsyncSession],
        manager: ConnectionManager,
        prefix: str,
        signals: NatsSignals | None = None,
    ) -> None:
        if leases.buckets != BUCKETS:  # the stored buckets and their counts (db.buckets) are of BUCKETS
            raise ValueError(f"a cluster has {BUCKETS} buckets, not {leases.buckets}")
        self.nc = nc
        self.leases = leases
        self.sessions = sessions
        self.manager = manager
        self.prefix = prefix
        self.replica_id = leases.replica_id
        self.outbox: OutboxWorker | None = None
        self._subscriptions: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._resync = asyncio.Event()
        self._lost: set[int] = set()
        # Searches coordinated here: id() of their inbox's subscription -> how to fail the search.
        self._inboxes: dict[int, Fail] = {}
        self.inbox_pending_msgs = INBOX_PENDING_MSGS
        self.inbox_pending_bytes = INBOX_PENDING_BYTES
        self.searches_incomplete = 0
        self.on_search_incomplete: list[Callable[[], None]] = []  # the metrics
        # Replicas NATS said no one serves -> when their leases were expired here (monotonic).
        self._expired_at: dict[str, float] = {}
        self._nats_up_since: float | None = float("-inf")  # monotonic; None while disconnected
        self.replicas_expired = 0  # replicas whose live leases this one expired ("no responders")
        if signals is not None:
            signals.slow_consumer.append(self._on_slow_consumer)
            signals.disconnected.append(self._on_disconnected)
            signals.reconnected.append(self._on_reconnected)
        manager.owns = self.owns
        manager.forward = self.forward
        leases.on_acquired.append(self._on_acquired)
        leases.on_lost.append(self._on_lost)
        leases.on_released.append(lambda: self._spawn(self._announce("released")))
        self._handed_over = False

    # --- lifecycle ---

    async def start(self) -> None:
        self._subscriptions.append(await self.nc.subscribe(f"{self.prefix}.instances", cb=self._on_instances))
        self._subscriptions.append(
            await self.nc.subscribe(f"{self.prefix}.search.{self.replica_id}", cb=self._on_search)
        )
        self._subscriptions.append(await self.nc.subscribe(f"{self.prefix}.rebalance", cb=self._on_rebalance))
        # The search subscription is at the server before the first lease is taken: a search that
        # names this replica as an owner never gets "no responders" for it (see `_on_owner_gone`).
        await self.nc.flush()
        await self.leases.start()
        self._spawn(self._resync_forever())
        await self._announce("joined")  # the others release above their share now; we take it then
        log_event(log, "cluster_joined", replica=self.replica_id, buckets=len(self.leases.held))

    async def handover(self) -> None:
        """A graceful stop's first step, before the drain: releases every lease (the others need not
        wait for an expiry), tells them so over NATS (they take the buckets at once, not at their next
        round) and drops this replica's streams. Searches in flight here still gather their replies
        (NATS stays up until `stop`); the buckets released meanwhile count as unreachable in them."""
        if self._handed_over:
            return
        self._handed_over = True
        started = asyncio.get_running_loop().time()
        held = len(self.leases.held)
        await self.leases.stop()
        await self._announce("left")
        await self._drop_lost()
        elapsed_ms = round((asyncio.get_running_loop().time() - started) * 1000, 1)
        log_event(log, "cluster_handed_over", replica=self.replica_id, buckets=held, ms=elapsed_ms)

    async def stop(self) -> None:
        """After the drain: hands over (if not yet done), then leaves NATS."""
        await self.handover()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        with contextlib.suppress(Exception):
            await self.nc.drain()

    def owns(self, instance_id: str) -> bool:
        return bucket_of(instance_id, self.leases.buckets) in self.leases.held

    def local_instances(self) -> Collection[str]:
        return self.manager.links.keys()

    # --- rebalancing ---

    async def _announce(self, why: str) -> None:
        await self._publish(f"{self.prefix}.rebalance", {"t": why, "replica": self.replica_id})
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=1)

    async def _on_rebalance(self, message: Any) -> None:
        try:
            body = json.loads(message.data)
            replica = str(body["replica"])
        except (ValueError, KeyError, TypeError) as exc:
            log_event(log, "cluster_message_dropped", logging.WARNING, error=repr(exc)[:200])
            return
        if replica != self.replica_id and not self._handed_over:
            self.leases.poke()

    # --- ownership of streams ---

    def forward(self, instance_id: str, address: str) -> None:
        """An instance another replica owns was claimed or re-registered here: tell its owner."""
        body = {"t": "ensure", "id": instance_id, "addr": address}
        self._spawn(self._publish(f"{self.prefix}.instances", body))

    def _on_acquired(self, bucket: int, token: int) -> None:
        self._resync.set()

    def _on_lost(self, bucket: int, token: int) -> None:
        first = not self._lost
        self._lost.add(bucket)
        if first:
            self._spawn(self._drop_lost())

    async def _drop_lost(self) -> None:
        lost, self._lost = self._lost, set()
        if not lost:
            return
        buckets = self.leases.buckets
        gone = [i for i in self.manager.links if bucket_of(i, buckets) in lost and not self.owns(i)]
        await self.manager.release(gone)
        log_event(
            log, "cluster_streams_dropped", replica=self.replica_id, buckets=len(lost), instances=len(gone)
        )

    async def _resync_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESYNC_SECONDS):
                    await self._resync.wait()
            self._resync.clear()
            try:
                await self.resync()
            except Exception as exc:  # the next round repairs it
                log_event(log, "cluster_resync_failed", logging.WARNING, error=repr(exc)[:200])

    async def resync(self) -> None:
        """Links every claimed instance of the buckets owned now; drops the other streams (another
        replica's, or of an instance no longer claimed, e.g. its owner deleted her account elsewhere)."""
        # The claimed instances of the buckets held now (the replica's share, not the cluster's N).
        read = set(self.leases.held)
        rows = await claimed_instances(self.sessions, read)
        # No await between the ownership check and the link: both see the same leases.
        linked = 0
        for instance_id, address in rows:
            if self.owns(instance_id) and instance_id not in self.manager.links:
                self.manager.link(instance_id, address)
                linked += 1
        claimed = {instance_id for instance_id, _ in rows}  # deleted accounts' instances too
        buckets = self.leases.buckets
        stray = [
            i
            for i in self.manager.links
            if not self.owns(i) or (bucket_of(i, buckets) in read and i not in claimed)
        ]
        if stray:
            await self.manager.release(stray)
        if linked or stray:
            log_event(log, "cluster_resynced", replica=self.replica_id, linked=linked, dropped=len(stray))

    # --- outbox ---

    def on_outbox_rows(self, rows: list[OutboxRow]) -> None:
        """Rows committed here for instances another replica owns: wake the owners' workers."""
        elsewhere = sorted({r.instance_id for r in rows if not self.owns(r.instance_id)})
        if elsewhere:
            self._spawn(self._publish(f"{self.prefix}.instances", {"t": "due", "ids": elsewhere}))

    async def _on_instances(self, message: Any) -> None:
        try:
            body = json.loads(message.data)
            kind = body["t"]
            if kind == "ensure":
                instance_id, address = str(body["id"]), str(body["addr"])
                if self.owns(instance_id):
                    self.manager.link(instance_id, address)
            elif kind == "due" and self.outbox is not None and any(self.owns(str(i)) for i in body["ids"]):
                self.outbox.wake()
        except (ValueError, KeyError, TypeError) as exc:
            log_event(log, "cluster_message_dropped", logging.WARNING, error=repr(exc)[:200])

    # --- search: the coordinator's side ---

    async def snapshot(self) -> dict[int, BucketSnapshot]:
        """Each bucket with claimed instances: its live owner (or None), token and claimed count.

        One statement (one read snapshot of the database) over at most BUCKETS rows of each table:
        the counts are `bucket_claims`, which triggers on `instances` keep in step with every claim,
        unclaim, insert and delete (migration 0008_bucket_claims), not a read of every claimed id.
        """
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(
                        BucketLeaseRow.bucket,
                        BucketLeaseRow.owner,
                        BucketLeaseRow.token,
                        BucketLeaseRow.expires_at > func.now(),
                        BucketClaimRow.claimed,
                    )
                    .join(BucketClaimRow, BucketClaimRow.bucket == BucketLeaseRow.bucket)
                    .where(BucketClaimRow.claimed > 0)
                )
            ).all()
        return {
            int(bucket): BucketSnapshot(int(bucket), owner if live else None, int(token), int(claimed))
            for bucket, owner, token, live, claimed in rows
        }

    async def search(
        self, data_need: energy_pb2.DataNeed, timeout: float
    ) -> AsyncGenerator[SearchUpdate | dict[str, int], None]:
        """Batches of matched ids from every owner, then the summary (see `cluster.search.gather`)."""
        snapshot = await self.snapshot()
        inbox = f"{self.prefix}.reply.{self.replica_id}.{secrets.token_hex(8)}"

        sids: list[int] = []

        async def subscribe(subject: str, callback: Any, fail: Fail) -> Any:
            subscription = await self.nc.subscribe(
                subject,
                cb=callback,
                pending_msgs_limit=self.inbox_pending_msgs,
                pending_bytes_limit=self.inbox_pending_bytes,
            )
            sids.append(id(subscription))
            self._inboxes[id(subscription)] = fail
            await self.nc.flush()  # the inbox exists at the server before any owner answers
            return subscription

        try:
            async for item in gather(
                snapshot,
                data_need.SerializeToString(),
                timeout,
                prefix=self.prefix,
                inbox=inbox,
                subscribe=subscribe,
                publish=self.nc.publish,
                on_owner_gone=self._on_owner_gone,
            ):
                yield item
        finally:
            for sid in sids:
                self._inboxes.pop(sid, None)

    def _on_slow_consumer(self, error: Any) -> None:
        fail = self._inboxes.pop(id(getattr(error, "sub", None)), None)
        if fail is not None:
            self._incomplete(fail, "slow_consumer", getattr(error, "subject", ""))
        else:  # another subscription (events, instances, searches to serve): resyncs and repairs cover it
            log_event(log, "nats_slow_consumer", logging.ERROR, subject=str(getattr(error, "subject", "")))

    def _on_owner_gone(self, owner: str) -> None:
        """A search's scatter to `owner` got "no responders": no one subscribes to its search subject.

        Its leases and heartbeat are expired (at most once per owner per lease period) so that the
        others take its buckets now, not when the leases run out. Never for this replica itself,
        nor while this replica's own NATS connection is down or came up less than
        SUSPECT_AFTER_CONNECT_SECONDS ago (after a NATS restart the others resubscribe in their own
        time). A replica that has just started is never suspected: `start` subscribes (and
        flushes) before it takes a lease, so a snapshot can only name an owner whose search
        subscription is at the server already (with a NATS cluster of several servers, interest
        crosses the routes asynchronously: a few ms in which a replica that took its first lease
        could still be thought gone; it then takes its share again at its next rounds).

        One race is left: a replica restarted under the same `--replica-id` that subscribes and
        takes leases in the milliseconds between the "no responders" for its dead predecessor and
        the expiry here loses those fresh leases too (and takes its share again at its next
        rounds): churn, not a second owner. See `LeaseKeeper.expire_replica` for why a replica
        wrongly thought gone keeps no bucket it could act for."""
        now = time.monotonic()
        if owner == self.replica_id or self._handed_over:
            return
        if self._nats_up_since is None or now - self._nats_up_since < SUSPECT_AFTER_CONNECT_SECONDS:
            log_event(log, "cluster_owner_gone_ignored", replica=owner, why="nats_reconnecting")
            return
        period = self.leases.lease_seconds
        self._expired_at = {r: t for r, t in self._expired_at.items() if now - t < period}
        if owner in self._expired_at:
            return
        self._expired_at[owner] = now
        self._spawn(self._expire_owner(owner))

    async def _expire_owner(self, owner: str) -> None:
        try:
            buckets = await self.leases.expire_replica(owner)
        except Exception as exc:  # the next search tries again; else the leases simply run out
            self._expired_at.pop(owner, None)
            log_event(log, "cluster_expire_failed", logging.WARNING, replica=owner, error=repr(exc)[:200])
            return
        if buckets:
            self.replicas_expired += 1
            self.leases.poke()
            await self._announce("gone")

    def _on_reconnected(self) -> None:
        self._nats_up_since = time.monotonic()

    def _on_disconnected(self) -> None:
        """Replies published while the connection was down are lost: every open search fails."""
        self._nats_up_since = None
        inboxes, self._inboxes = self._inboxes, {}
        for fail in inboxes.values():
            self._incomplete(fail, "disconnected", "")

    def _incomplete(self, fail: Fail, why: str, subject: str) -> None:
        self.searches_incomplete += 1
        log_event(log, "cluster_search_incomplete", logging.ERROR, why=why, inbox=subject)
        for listener in self.on_search_incomplete:
            listener()
        fail(
            Unavailable(
                "replies to this search were lost between replicas (NATS fell behind); retry",
                reason="SEARCH_INCOMPLETE",
            )
        )

    # --- search: the owner's side ---

    async def _on_search(self, message: Any) -> None:
        try:
            body = json.loads(message.data)
            need = energy_pb2.DataNeed.FromString(bytes.fromhex(body["need"]))
            buckets = {int(b): int(t) for b, t in body["buckets"].items()}
            reply, timeout = str(body["reply"]), float(body["timeout"])
        except Exception as exc:
            log_event(log, "cluster_search_dropped", logging.WARNING, error=repr(exc)[:200])
            return
        deadline = asyncio.get_running_loop().time() + timeout * OWNER_DEADLINE_SHARE
        groups: dict[int, list[str]] = {b: [] for b in buckets}
        for instance_id in self.manager.links:
            bucket = bucket_of(instance_id, self.leases.buckets)
            if bucket in groups:
                groups[bucket].append(instance_id)
        for bucket, token in buckets.items():
            if self.leases.held.get(bucket) == token:
                self._spawn(self._serve_bucket(need, bucket, token, groups[bucket], reply, deadline))
            else:  # not ours under that token: the coordinator counts the bucket unreachable
                held = self.leases.held.get(bucket, -1)
                self._spawn(self._publish(reply, BucketTally(bucket, held, 0, 0, 0, 0, 0).to_json()))

    async def _serve_bucket(
        self,
        need: energy_pb2.DataNeed,
        bucket: int,
        token: int,
        instance_ids: list[str],
        reply: str,
        deadline: float,
    ) -> None:
        tally = self.manager.begin_search(need, instance_ids)
        try:
            # Progress rides on these batches (`a`); the owner sends no messages of its own for it.
            async for batch in tally.batches(deadline):
                body = {"t": "matches", "b": bucket, "k": token, "ids": batch, "a": tally.answered}
                await self._publish(reply, body)
        finally:
            timed_out = self.manager.end_search(tally)
        # Fenced: lost mid-search, the bucket's answers are not ours to report.
        held = self.leases.held.get(bucket, -1)
        final = BucketTally(
            bucket, held, tally.queried, tally.matched, tally.not_matched, tally.unreachable, timed_out
        )
        await self._publish(reply, final.to_json())

    # --- plumbing ---

    async def _publish(self, subject: str, body: dict[str, Any]) -> None:
        try:
            await self.nc.publish(subject, json.dumps(body, separators=(",", ":")).encode())
        except Exception as exc:
            log_event(log, "cluster_publish_failed", logging.WARNING, subject=subject, error=repr(exc)[:200])

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
