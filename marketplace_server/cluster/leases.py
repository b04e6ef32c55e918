"""Ownership of instance buckets among marketplace replicas: leases with fencing tokens.

The shape is Temporal's shard ownership. Claimed instances hash into a fixed
number of buckets; each bucket has one lease row in PostgreSQL with its `owner`
(a replica id), a `token` that increases on every takeover, and `expires_at` by
the database's clock (replica clocks never decide). Every `renew_interval` a
replica:

1. heartbeats its row in `replicas` (the live replicas decide the fair share);
2. renews the leases it holds (`WHERE owner = me AND token = mine`): a bucket
   that is not renewed was taken over, and is dropped at once;
3. releases buckets above its fair share (a replica joined), so they move
   within one interval instead of waiting for an expiry;
4. takes free or expired buckets up to its share, `FOR UPDATE SKIP LOCKED`, each
   takeover incrementing the token.

A replica that cannot renew before its leases would expire drops every bucket
itself (self-fencing), so two replicas never both act for one bucket as long as
writes on behalf of a bucket check the token in the same transaction
(`assert_lease`). On a graceful stop it releases everything at once.

Replicas tell each other when buckets come free (a replica joined, left or
released above its share; `ClusterNode` does it over NATS); `poke()` then runs a
round at once instead of at the next interval, so a rolling restart moves
buckets within a round trip rather than a renewal interval.

A replica NATS says is gone (a search's scatter to it got "no responders": its
process died and the server closed its connection) need not be waited for:
`expire_replica` ends its live leases and its heartbeat now, in one
transaction, and the others take its buckets at their next round (poked at once)
instead of up to LEASE_SECONDS + RENEW_SECONDS later. Why that is safe even when
the replica is in fact alive is in `expire_replica`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie_common.errors import Aborted
from eddie_common.logging import log_event
from marketplace_server.db.buckets import BUCKETS, bucket_of
from marketplace_server.db.models import BucketLeaseRow, ReplicaRow

__all__ = ["BUCKETS", "LeaseKeeper", "LeaseLost", "assert_lease", "bucket_of"]

log = logging.getLogger(__name__)

# A dead replica's buckets are free after at most LEASE_SECONDS + RENEW_SECONDS (its last renewal,
# then the survivors' next round), which with the reopening of its streams must stay within the
# 15 s a takeover may take. A live replica fences itself after LEASE_SECONDS - RENEW_SECONDS
# without a renewal: four rounds (each bounded by TICK_SECONDS) in a row must fail first.
LEASE_SECONDS = 6.0
RENEW_SECONDS = 1.0
TICK_SECONDS = 2.0

Listener = Callable[[int, int], None]  # (bucket, token)


class LeaseLost(Aborted):
    """A write on behalf of a bucket whose lease this replica no longer holds."""

    def __init__(self, bucket: int) -> None:
        super().__init__(f"bucket {bucket} is owned by another replica now", reason="LEASE_LOST")


async def assert_lease(session: AsyncSession, bucket: int, owner: str, token: int) -> None:
    """Fencing: inside the caller's transaction, the lease must still be (owner, token) and live."""
    held = await session.scalar(
        select(BucketLeaseRow.bucket)
        .where(
            BucketLeaseRow.bucket == bucket,
            BucketLeaseRow.owner == owner,
            BucketLeaseRow.token == token,
            BucketLeaseRow.expires_at > func.now(),
        )
        .with_for_update(read=True)
    )
    if held is None:
        raise LeaseLost(bucket)


@dataclass
class LeaseKeeper:
    """Keeps this replica's share of the bucket leases (PostgreSQL only)."""

    sessions: async_sessionmaker[AsyncSession]
    replica_id: str
    address: str = ""
    buckets: int = BUCKETS
    lease_seconds: float = LEASE_SECONDS
    renew_seconds: float = RENEW_SECONDS

    def __post_init__(self) -> None:
        self.held: dict[int, int] = {}  # bucket -> token
        self.on_acquired: list[Listener] = []
        self.on_lost: list[Listener] = []
        # Called after a round that released buckets above the fair share (others may take them now).
        self.on_released: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._renewed_at = float("-inf")  # monotonic time of the last successful renew
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # --- lifecycle ---

    async def start(self) -> None:
        await self._seed()
        await self.tick()
        self._task = asyncio.create_task(self._run(), name="leases")

    def poke(self) -> None:
        """Runs the next round now (another replica joined or left, or released buckets)."""
        self._wake.set()

    async def stop(self) -> None:
        """Hands every bucket over at once (no wait for an expiry) and leaves the replica set."""
        if self._stopping:
            return
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        held, self.held = dict(self.held), {}
        for bucket, token in held.items():
            self._notify(self.on_lost, bucket, token)
        try:
            async with self.sessions.begin() as session:
                await session.execute(
                    update(BucketLeaseRow)
                    .where(BucketLeaseRow.owner == self.replica_id)
                    .values(owner=None, expires_at=func.now())
                )
                await session.execute(delete(ReplicaRow).where(ReplicaRow.id == self.replica_id))
        except Exception as exc:  # the leases then simply expire
            log_event(log, "leases_release_failed", logging.WARNING, error=repr(exc)[:200])
        log_event(log, "leases_released", replica=self.replica_id, buckets=len(held))

    def owns(self, bucket: int) -> bool:
        return bucket in self.held

    async def expire_replica(self, replica_id: str) -> int:
        """Ends another replica's live leases and its heartbeat now, in one transaction; returns how
        many buckets it held (0: nothing of it was live any more, e.g. another replica did it first).

        For a replica that NATS says no one serves (`ClusterNode._on_owner_gone`): its buckets are
        free at once (owner and token stay: a takeover still increments the token) and its heartbeat
        no longer counts, so the fair share of the others covers its buckets.

        Safe even if that replica is alive (cut off from NATS, or its subscription briefly gone): it
        could not serve searches then anyway, and ownership stays fenced by the tokens.

        - Searches: a coordinator counts a bucket's tally only under the token of its snapshot, and
          its snapshot names only live leases; a bucket expired here is unreachable until taken
          over, then searched under the new token; an answer under the old one is never counted.
        - Writes that take the bucket's lease into their transaction (`assert_lease`) check owner,
          token and expiry, so they are refused from now on. (Today nothing but the lease rounds
          writes under a lease: the streams, the outbox deliveries over them and the statuses
          they report follow `held`, i.e. they stop at the replica's next round below.)
        - The replica finds out at its next round (within `renew_seconds` plus one round): a bucket
          another replica took meanwhile is not renewed (its token changed), so it is dropped and
          its streams stop, as for any takeover. Until then both may hold a stream to the same
          AIIDA and both may deliver one outbox row; deliveries are at least once already (a
          replica that dies mid-delivery leaves the row to be sent again), and configure / revoke
          name their permission, so a second one changes nothing.
        - A bucket nobody took yet is renewed by that round (`_renew` matches owner and token, not
          `expires_at`). Deliberately: the token did not change, so no other replica ever acted
          for the bucket, and the lease is simply live again under the same (owner, token); the
          row locks order the renewal against a takeover (`_acquire` locks the row with `FOR UPDATE
          SKIP LOCKED` and re-checks the expiry on the newest version; a renewal that waited on a
          takeover's lock finds the owner changed). Refusing it would need a column to tell an
          expiry from a late renewal, and would only move the bucket away from a replica that can
          still hold its streams.

        A replica never expires itself (ValueError): it would drop its own buckets on a message
        about its own subscription.
        """
        if replica_id == self.replica_id:
            raise ValueError("a replica never expires its own leases")
        async with self.sessions.begin() as session:
            buckets = (
                await session.scalars(
                    update(BucketLeaseRow)
                    .where(BucketLeaseRow.owner == replica_id, BucketLeaseRow.expires_at > func.now())
                    .values(expires_at=func.now())
                    .returning(BucketLeaseRow.bucket)
                )
            ).all()
            heartbeat = (
                await session.scalars(
                    update(ReplicaRow)
                    .where(ReplicaRow.id == replica_id, ReplicaRow.expires_at > func.now())
                    .values(expires_at=func.now())
                    .returning(ReplicaRow.id)
                )
            ).all()
        if buckets or heartbeat:
            log_event(
                log,
                "leases_replica_expired",
                logging.WARNING,
                replica=replica_id,
                buckets=len(buckets),
                heartbeat=bool(heartbeat),
                by=self.replica_id,
            )
        return len(buckets)

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_seconds):
                    await self._wake.wait()
            self._wake.clear()
            try:
                # A hung database must not stop fencing; a slow round (a loaded machine) is not a failure.
                limit = max(self.renew_seconds * 1.5, min(TICK_SECONDS, self.lease_seconds / 3))
                async with asyncio.timeout(limit):
                    await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log_event(log, "leases_renew_failed", logging.WARNING, error=repr(exc)[:200])
            self._fence_if_stale()

    # --- one round ---

    async def tick(self) -> None:
        """Heartbeat, renew, rebalance; raises if the database can't be reached."""
        ttl = timedelta(seconds=self.lease_seconds)
        started = time.monotonic()  # not later than the database's now(): leases expire after this + ttl
        async with self.sessions.begin() as session:
            await self._heartbeat(session, ttl)
            live = await session.scalar(
                select(func.count()).select_from(ReplicaRow).where(ReplicaRow.expires_at > func.now())
            )
            renewed = await self._renew(session, ttl)
            share = math.ceil(self.buckets / max(1, int(live or 1)))
            released = await self._release_above(session, renewed, share)
            acquired = await self._acquire(session, ttl, share - len(renewed) + len(released))
        self._renewed_at = started
        for bucket, token in self.held.items():
            if renewed.get(bucket) != token:
                self._notify(self.on_lost, bucket, token)
        self.held = {b: t for b, t in renewed.items() if b not in released}
        for bucket in released:
            self._notify(self.on_lost, bucket, renewed[bucket])
        if released:
            for listener in self.on_released:
                try:
                    listener()
                except Exception:
                    log.exception("lease_listener_failed")
        for bucket, token in acquired.items():
            self.held[bucket] = token
            self._notify(self.on_acquired, bucket, token)
        if released or acquired:
            log_event(
                log,
                "leases_rebalanced",
                replica=self.replica_id,
                held=len(self.held),
                acquired=len(acquired),
                released=len(released),
                replicas=int(live or 0),
            )

    async def _seed(self) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                postgresql.insert(BucketLeaseRow)
                .values(
                    [
                        {"bucket": b, "owner": None, "token": 0, "expires_at": func.now()}
                        for b in range(self.buckets)
                    ]
                )
                .on_conflict_do_nothing(index_elements=[BucketLeaseRow.bucket])
            )

    async def _heartbeat(self, session: AsyncSession, ttl: timedelta) -> None:
        statement = postgresql.insert(ReplicaRow).values(
            id=self.replica_id, address=self.address, expires_at=func.now() + ttl
        )
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[ReplicaRow.id], set_={"expires_at": statement.excluded.expires_at}
            )
        )

    async def _renew(self, session: AsyncSession, ttl: timedelta) -> dict[int, int]:
        if not self.held:
            return {}
        conditions = [
            and_(BucketLeaseRow.bucket == b, BucketLeaseRow.token == t) for b, t in self.held.items()
        ]
        result = await session.execute(
            update(BucketLeaseRow)
            .where(BucketLeaseRow.owner == self.replica_id, or_(*conditions))
            .values(expires_at=func.now() + ttl)
            .returning(BucketLeaseRow.bucket, BucketLeaseRow.token)
        )
        return {int(b): int(t) for b, t in result.all()}

    async def _release_above(self, session: AsyncSession, renewed: dict[int, int], share: int) -> set[int]:
        extra = sorted(renewed)[share:] if len(renewed) > share else []
        if extra:
            await session.execute(
                update(BucketLeaseRow)
                .where(BucketLeaseRow.owner == self.replica_id, BucketLeaseRow.bucket.in_(extra))
                .values(owner=None, expires_at=func.now())
            )
        return set(extra)

    async def _acquire(self, session: AsyncSession, ttl: timedelta, wanted: int) -> dict[int, int]:
        if wanted <= 0:
            return {}
        free = list(
            await session.scalars(
                select(BucketLeaseRow.bucket)
                .where(or_(BucketLeaseRow.owner.is_(None), BucketLeaseRow.expires_at <= func.now()))
                .order_by(BucketLeaseRow.bucket)
                .limit(wanted)
                .with_for_update(skip_locked=True)
            )
        )
        if not free:
            return {}
        result = await session.execute(
            update(BucketLeaseRow)
            .where(BucketLeaseRow.bucket.in_(free))
            .values(owner=self.replica_id, token=BucketLeaseRow.token + 1, expires_at=func.now() + ttl)
            .returning(BucketLeaseRow.bucket, BucketLeaseRow.token)
        )
        return {int(b): int(t) for b, t in result.all()}

    def _fence_if_stale(self) -> None:
        """Self-fencing: past the lease time without a renewal, another replica may own our buckets."""
        margin = self.renew_seconds
        if self.held and time.monotonic() - self._renewed_at > self.lease_seconds - margin:
            held, self.held = self.held, {}
            log_event(log, "leases_self_fenced", logging.WARNING, replica=self.replica_id, buckets=len(held))
            for bucket, token in held.items():
                self._notify(self.on_lost, bucket, token)

    def _notify(self, listeners: list[Listener], bucket: int, token: int) -> None:
        for listener in listeners:
            try:
                listener(bucket, token)
            except Exception:
                log.exception("lease_listener_failed")
