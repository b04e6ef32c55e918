"""A search across replicas: scatter the query to the owners of the buckets, gather batches and tallies.

The replica serving SearchInstances snapshots the buckets (owner, fencing
token, claimed instances), sends the query once to each owner on
`{prefix}.search.{replica}` with a reply subject of the owner's own under the
search's inbox (`{inbox}.{replica}`, one subscription `{inbox}.*` for all), and
gathers:

- `matches` messages: batches of matched instance ids of one bucket, streamed
  on to the EP as they arrive, with the bucket's answers so far (`a`);
- one `tally` per bucket carrying the token it was searched under.

The running progress sent to the EP (`answered` of `queried`) adds up, per bucket,
the most answers any of its messages reported; a bucket's tally arriving (or its
owner found gone, below) is the only progress without a match, sent at most once
every PROGRESS_INTERVAL. Owners send no progress messages of their own: no NATS
traffic is added to a search.

Every claimed instance is counted exactly once. A bucket's tally counts only if
its token is the snapshot's; a bucket whose owner died, whose token changed, or
whose tally did not arrive by the deadline counts its instances that did not
already match as unreachable (or timed out), never twice.

An owner nobody serves: the scatter carries its reply subject as the NATS reply,
so when no one subscribes to `{prefix}.search.{owner}` (its process died and
NATS closed its connection) the server answers at once with a "no responders"
status (header `Status: 503`, no payload) on `{inbox}.{owner}`. That owner's
open buckets count as unreachable at once and the search ends as soon as every
bucket is settled, instead of waiting for its deadline; `on_owner_gone(owner)`
tells the caller (the node then expires the owner's leases, see
`ClusterNode._on_owner_gone`). No reply can come from an owner that nothing
received the query for, so no bucket is counted twice.

A reply the inbox lost (a NATS slow consumer: its pending limit overflowed, or
the connection dropped mid-search) fails the search loudly with UNAVAILABLE /
SEARCH_INCOMPLETE: which bucket the lost message belonged to is unknown (nats-py
reports the subscription, not the payload), so it cannot be counted as that
bucket's timeout; a lost `matches` batch would otherwise be a silently short
match set under an exact-looking summary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from eddie_common.errors import Unavailable
from marketplace_server.aiida.fanout import PROGRESS_INTERVAL, SearchUpdate

__all__ = [
    "BucketSnapshot",
    "BucketTally",
    "ClusterSearchTally",
    "gather",
    "no_responders",
    "search_request",
]

log = logging.getLogger(__name__)

# The status NATS sends to a request's reply subject when no one subscribes to its subject (nats-py
# enables it when the server supports headers, and gives it to a subscription as a message with
# `headers == {"Status": "503"}` and an empty payload).
NO_RESPONDERS_STATUS = "503"


def no_responders(message: Any) -> bool:
    """Whether a message on a reply subject is the server's "no responders" status."""
    headers = getattr(message, "headers", None)
    return bool(headers and headers.get("Status") == NO_RESPONDERS_STATUS and not message.data)


@dataclass(frozen=True)
class BucketSnapshot:
    """A bucket as the search found it: its owner, fencing token and claimed instances."""

    bucket: int
    owner: str | None
    token: int
    claimed: int


@dataclass(frozen=True)
class BucketTally:
    """An owner's final count for one bucket, under the token it searched with."""

    bucket: int
    token: int
    queried: int
    matched: int
    not_matched: int
    unreachable: int
    timed_out: int

    def to_json(self) -> dict[str, Any]:
        return {
            "t": "tally",
            "b": self.bucket,
            "k": self.token,
            "q": self.queried,
            "m": self.matched,
            "n": self.not_matched,
            "u": self.unreachable,
            "o": self.timed_out,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> BucketTally:
        return cls(
            int(body["b"]), int(body["k"]), int(body["q"]), int(body["m"]), int(body["n"]), int(body["u"]),
            int(body["o"]),
        )  # fmt: skip


@dataclass
class ClusterSearchTally:
    """Merges what the owners report into one summary, each bucket counted once."""

    snapshot: dict[int, BucketSnapshot]
    matched_ids: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    _matched_in: dict[int, int] = field(default_factory=dict)  # bucket -> ids accepted so far
    _answered_in: dict[int, int] = field(default_factory=dict)  # bucket -> most answers reported so far
    _final: dict[int, BucketTally] = field(default_factory=dict)
    _lost: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        # A bucket no live replica owns is unreachable from the start: nothing is waited for it, so
        # a search ends as soon as the owned buckets are settled (e.g. between an owner's expiry and
        # the takeover of its buckets).
        for bucket, shot in self.snapshot.items():
            if shot.owner is None:
                self._lost.add(bucket)
                self._answered_in[bucket] = shot.claimed

    def on_matches(self, bucket: int, token: int, ids: list[str], answered: int = 0) -> list[str]:
        """Accepts a batch from the snapshot owner's token; returns the ids that are new.

        `answered` is the bucket's count of answers when its owner sent the batch.
        """
        shot = self.snapshot.get(bucket)
        if shot is None or shot.token != token or bucket in self._final or bucket in self._lost:
            return []
        fresh = [i for i in ids if i not in self._seen]
        self._seen.update(fresh)
        self.matched_ids.extend(fresh)
        matched = self._matched_in[bucket] = self._matched_in.get(bucket, 0) + len(fresh)
        self._answered_in[bucket] = max(self._answered_in.get(bucket, 0), answered, matched)
        return fresh

    def on_tally(self, tally: BucketTally) -> None:
        shot = self.snapshot.get(tally.bucket)
        if shot is None or tally.bucket in self._final or tally.bucket in self._lost:
            return
        if shot.token != tally.token:  # taken over mid-search: its instances are unreachable this time
            self._lost.add(tally.bucket)
            return
        self._final[tally.bucket] = tally
        # As the summary counts it: everyone asked (or not reachable) but the timed out.
        answered = max(shot.claimed, tally.queried) - tally.timed_out
        self._answered_in[tally.bucket] = max(self._answered_in.get(tally.bucket, 0), answered)

    def progress(self) -> tuple[int, int]:
        """(answered, queried) so far: neither decreases, and answered <= queried."""
        queried = 0
        for bucket, shot in self.snapshot.items():
            final = self._final.get(bucket)
            reported = final.queried if final is not None else 0
            queried += max(shot.claimed, reported, self._matched_in.get(bucket, 0))
        answered = sum(self._answered_in.values())
        return min(answered, queried), queried

    def on_owner_lost(self, owner: str) -> None:
        """The owner's replica died (or dropped the search): its open buckets are unreachable.

        In the progress they count as answered, as a tally's unreachable instances do."""
        for bucket, shot in self.snapshot.items():
            if shot.owner == owner and bucket not in self._final and bucket not in self._lost:
                self._lost.add(bucket)
                self._answered_in[bucket] = max(self._answered_in.get(bucket, 0), shot.claimed)

    @property
    def complete(self) -> bool:
        return len(self._final) + len(self._lost) >= len(self.snapshot)

    def summary(self) -> dict[str, int]:
        """queried = matched + not_matched + unreachable + timed_out; open buckets count as timed out."""
        totals = {"queried": 0, "matched": 0, "not_matched": 0, "unreachable": 0, "timed_out": 0}
        for bucket, shot in self.snapshot.items():
            final = self._final.get(bucket)
            matched = self._matched_in.get(bucket, 0)
            if final is not None:
                # The owner's counts are authoritative; matches it reported but we never saw are
                # counted as matched (they were lost in transit, not unanswered).
                # Claimed instances the owner holds no stream for yet (it took the bucket over a
                # moment ago) were not asked: unreachable, so that queried is still the claimed count.
                missing = max(0, shot.claimed - final.queried)
                totals["queried"] += final.queried + missing
                totals["matched"] += final.matched
                totals["not_matched"] += final.not_matched
                totals["unreachable"] += final.unreachable + missing
                totals["timed_out"] += final.timed_out
                continue
            queried = max(shot.claimed, matched)
            totals["queried"] += queried
            totals["matched"] += matched
            rest = queried - matched
            if shot.owner is None or bucket in self._lost:
                totals["unreachable"] += rest
            else:
                totals["timed_out"] += rest
        return totals


def search_request(
    query_id: str, data_need: bytes, buckets: dict[int, int], reply: str, timeout: float
) -> bytes:
    """The scatter message to one owner: the query once, the buckets with the tokens to search under."""
    return json.dumps(
        {
            "q": query_id,
            "need": data_need.hex(),
            "buckets": {str(b): t for b, t in buckets.items()},
            "reply": reply,
            "timeout": timeout,
        },
        separators=(",", ":"),
    ).encode()


Fail = Callable[[BaseException], None]
# subscribe(subject, on_reply, fail): `fail(error)` ends the search with `error` (e.g. replies were lost).
# The subject is a wildcard (`{inbox}.*`): one subscription for all of the search's replies.
Subscribe = Callable[[str, Callable[[Any], Awaitable[None]], Fail], Awaitable[Any]]


class Publish(Protocol):
    """nats-py's `publish(subject, payload, reply=...)`: `reply` is the subject NATS answers "no
    responders" on."""

    def __call__(self, subject: str, payload: bytes, /, *, reply: str = "") -> Awaitable[None]: ...


async def gather(
    snapshot: dict[int, BucketSnapshot],
    data_need: bytes,
    timeout: float,
    *,
    prefix: str,
    inbox: str,
    subscribe: Subscribe,
    publish: Publish,
    live_owners: Callable[[], set[str]] = lambda: set(),
    on_owner_gone: Callable[[str], None] | None = None,
) -> AsyncIterator[SearchUpdate | dict[str, int]]:
    """Scatters the query and yields batches of new matched ids with the running counts (an empty
    batch: progress only), then the summary (a dict) last.

    `on_owner_gone(owner)`: NATS said no one serves `owner`'s search subject (called once per owner,
    also after the search ended)."""
    tally = ClusterSearchTally(snapshot)
    queue: asyncio.Queue[list[str] | None] = asyncio.Queue()  # [] asks for a progress update
    failure: list[BaseException] = []
    # Set when the search ends (deadline, every bucket settled, failure). What arrives later is not
    # counted: the summary must add up to exactly the ids the EP was sent, and the EP may still be
    # reading the last batch when a late reply lands (the generator is suspended in its yield).
    closed = False
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    progress_due: asyncio.TimerHandle | None = None

    def send_progress() -> None:
        nonlocal progress_due
        progress_due = None
        queue.put_nowait([])

    def progress_later() -> None:
        """A progress update no sooner than PROGRESS_INTERVAL after the last message."""
        nonlocal progress_due
        if progress_due is None:
            progress_due = loop.call_at(max(loop.time(), last_sent + PROGRESS_INTERVAL), send_progress)

    def close() -> None:
        nonlocal closed
        if not closed:
            closed = True
            queue.put_nowait(None)

    def owner_gone(owner: str) -> None:
        if on_owner_gone is not None:
            try:
                on_owner_gone(owner)
            except Exception:
                log.exception("cluster_owner_gone_listener_failed")
        if closed:
            return
        tally.on_owner_lost(owner)  # nothing received the query: none of its buckets can answer
        if tally.complete:
            close()
        else:
            progress_later()

    async def on_reply(message: Any) -> None:
        if no_responders(message):
            owner = str(getattr(message, "subject", ""))[len(inbox) + 1 :]
            if owner in by_owner and owner not in gone:
                gone.add(owner)
                owner_gone(owner)
            return
        if closed:
            return
        try:
            body = json.loads(message.data)
            if body.get("t") == "matches":
                ids = [str(i) for i in body["ids"]]
                fresh = tally.on_matches(int(body["b"]), int(body["k"]), ids, int(body.get("a", 0)))
                if fresh:
                    queue.put_nowait(fresh)
            elif body.get("t") == "tally":
                tally.on_tally(BucketTally.from_json(body))
                if not tally.complete:
                    progress_later()
            elif body.get("t") == "slow":
                fail(Unavailable("a replica fell behind during the search", reason="SEARCH_OVERLOADED"))
                return
        except (ValueError, KeyError, TypeError):
            return  # a malformed reply counts as no reply for its bucket
        if tally.complete:
            close()

    def fail(error: BaseException) -> None:
        if not failure:
            failure.append(error)
            close()

    query_id = secrets.token_hex(8)
    by_owner: dict[str, dict[int, int]] = {}
    for bucket, shot in snapshot.items():
        if shot.owner is not None:
            by_owner.setdefault(shot.owner, {})[bucket] = shot.token
    gone: set[str] = set()  # owners NATS said no one serves
    subscription = await subscribe(f"{inbox}.*", on_reply, fail)
    try:
        for owner, buckets in by_owner.items():
            # The owner replies to the body's `reply`; the NATS reply is where "no responders" comes.
            reply = f"{inbox}.{owner}"
            await publish(
                f"{prefix}.search.{owner}",
                search_request(query_id, data_need, buckets, reply, timeout),
                reply=reply,
            )
        if tally.complete or not by_owner:
            close()
        timer = loop.call_later(timeout, close)
        try:
            ended = False
            answered_sent = -1
            while not ended and (batch := await queue.get()) is not None:
                while not queue.empty():  # everything that arrived while the last batch was written
                    more = queue.get_nowait()
                    if more is None:
                        ended = True
                        break
                    batch.extend(more)
                answered, queried = tally.progress()
                if batch or (answered != answered_sent and not ended):
                    answered_sent = answered
                    yield SearchUpdate(batch, answered, queried)
                    last_sent = loop.time()
        finally:
            timer.cancel()
            if progress_due is not None:
                progress_due.cancel()
        if failure:
            raise failure[0]
        live = live_owners()
        for owner in by_owner:
            if live and owner not in live:
                tally.on_owner_lost(owner)
        yield tally.summary()
    finally:
        unsubscribe = getattr(subscription, "unsubscribe", None)
        if unsubscribe is not None:
            await unsubscribe()
