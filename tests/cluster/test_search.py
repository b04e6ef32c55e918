"""The cluster search's gather: every claimed instance counted once, whatever the owners do."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from eddie_common.errors import Unavailable
from marketplace_server.aiida.fanout import SearchUpdate
from marketplace_server.cluster.search import BucketSnapshot, BucketTally, ClusterSearchTally, gather
from tests.cluster.test_events import NATS_URL, nats_reachable

Handler = Callable[[Any], Awaitable[None]]


class Message:
    def __init__(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.subject, self.data, self.headers = subject, data, headers


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching with `*` (one token)."""
    tokens, wanted = pattern.split("."), subject.split(".")
    return len(tokens) == len(wanted) and all(t in ("*", w) for t, w in zip(tokens, wanted, strict=True))


class Bus:
    """An in-memory stand-in for NATS subjects (the owners' behaviour is what is under test).

    As NATS does, a publish with a reply subject to a subject no one subscribes to gets a "no
    responders" status on the reply subject at once (header Status 503, no payload)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.fail: dict[str, Callable[[BaseException], None]] = {}

    async def subscribe(self, subject: str, handler: Handler, fail: Callable[[BaseException], None]) -> None:
        self.handlers[subject] = handler
        self.fail[subject] = fail

    def handler(self, subject: str) -> Handler | None:
        return next((h for pattern, h in self.handlers.items() if matches(pattern, subject)), None)

    def fail_for(self, subject: str) -> Callable[[BaseException], None]:
        return next(f for pattern, f in self.fail.items() if matches(pattern, subject))

    async def publish(self, subject: str, data: bytes, *, reply: str = "") -> None:
        handler = self.handler(subject)
        if handler is not None:
            self.deliver(handler, Message(subject, data))
        elif reply and (inbox := self.handler(reply)) is not None:
            self.deliver(inbox, Message(reply, b"", {"Status": "503"}))

    def deliver(self, handler: Handler, message: Message) -> None:
        task = asyncio.create_task(handler(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def owner(
    bus: Bus,
    name: str,
    answers: dict[int, tuple[list[str], int]],
    *,
    token_shift: int = 0,
    tally: bool = True,
    duplicate: bool = False,
    tally_after: float = 0.0,
) -> None:
    """An owner replica: per bucket, (matched ids, not matched count)."""

    async def on_search(message: Message) -> None:
        request = json.loads(message.data)
        for bucket_text, token in request["buckets"].items():
            bucket = int(bucket_text)
            ids, not_matched = answers[bucket]
            for _ in range(2 if duplicate else 1):
                sent = 0
                for half in (ids[: len(ids) // 2], ids[len(ids) // 2 :]):
                    sent += len(half)
                    body = {"t": "matches", "b": bucket, "k": token + token_shift, "ids": half, "a": sent}
                    await bus.publish(request["reply"], json.dumps(body).encode())
            if tally:
                await asyncio.sleep(tally_after)
                t = BucketTally(
                    bucket, token + token_shift, len(ids) + not_matched, len(ids), not_matched, 0, 0
                )
                await bus.publish(request["reply"], json.dumps(t.to_json()).encode())

    bus.handlers[f"p.search.{name}"] = on_search


async def run(
    bus: Bus,
    snapshot: dict[int, BucketSnapshot],
    timeout: float = 0.5,
    live: set[str] | None = None,
    updates: list[SearchUpdate] | None = None,
    gone: list[str] | None = None,
) -> tuple[list[list[str]], dict[str, int]]:
    batches: list[list[str]] = []
    summary: dict[str, int] = {}
    async for item in gather(
        snapshot,
        b"need",
        timeout,
        prefix="p",
        inbox="inbox.1",
        subscribe=bus.subscribe,
        publish=bus.publish,
        live_owners=lambda: live or set(),
        on_owner_gone=None if gone is None else gone.append,
    ):
        if isinstance(item, dict):
            summary = item
        else:
            if item.ids:
                batches.append(item.ids)
            if updates is not None:
                updates.append(item)
    return batches, summary


def balanced(summary: dict[str, int]) -> bool:
    return summary["queried"] == sum(
        summary[k] for k in ("matched", "not_matched", "unreachable", "timed_out")
    )


async def test_matches_from_every_owner_arrive_once_and_the_summary_is_exact() -> None:
    bus = Bus()
    owner(bus, "a", {0: (["i1", "i2"], 3), 1: (["i3"], 0)}, duplicate=True)
    owner(bus, "b", {2: ([], 4)})
    snapshot = {
        0: BucketSnapshot(0, "a", 5, 5),
        1: BucketSnapshot(1, "a", 2, 1),
        2: BucketSnapshot(2, "b", 9, 4),
    }
    batches, summary = await run(bus, snapshot)
    ids = [i for batch in batches for i in batch]
    assert sorted(ids) == ["i1", "i2", "i3"] and len(ids) == len(set(ids))
    assert summary == {"queried": 10, "matched": 3, "not_matched": 7, "unreachable": 0, "timed_out": 0}


async def test_a_bucket_taken_over_mid_search_counts_as_unreachable_not_twice() -> None:
    bus = Bus()
    owner(bus, "a", {0: (["i1"], 1)})
    owner(bus, "b", {1: (["i2"], 2)}, token_shift=1)  # b searched under a newer token than the snapshot's
    snapshot = {0: BucketSnapshot(0, "a", 1, 2), 1: BucketSnapshot(1, "b", 1, 3)}
    batches, summary = await run(bus, snapshot)
    assert [i for b in batches for i in b] == ["i1"]
    assert summary == {"queried": 5, "matched": 1, "not_matched": 1, "unreachable": 3, "timed_out": 0}


async def test_an_owner_that_died_mid_search_keeps_its_matches_and_the_rest_is_unreachable() -> None:
    bus = Bus()
    owner(bus, "a", {0: (["i1"], 0)})
    owner(bus, "dead", {1: (["i2", "i3"], 5)}, tally=False)  # sent its matches, then died
    snapshot = {0: BucketSnapshot(0, "a", 1, 1), 1: BucketSnapshot(1, "dead", 4, 10)}
    batches, summary = await run(bus, snapshot, timeout=0.3, live={"a"})
    assert sorted(i for b in batches for i in b) == ["i1", "i2", "i3"]
    assert summary == {"queried": 11, "matched": 3, "not_matched": 0, "unreachable": 8, "timed_out": 0}
    assert balanced(summary)


async def test_a_silent_live_owner_times_out_and_an_unowned_bucket_is_unreachable() -> None:
    bus = Bus()
    owner(bus, "slow", {0: ([], 0)}, tally=False)
    snapshot = {0: BucketSnapshot(0, "slow", 2, 6), 1: BucketSnapshot(1, None, 0, 4)}
    _, summary = await run(bus, snapshot, timeout=0.2, live={"slow"})
    assert summary == {"queried": 10, "matched": 0, "not_matched": 0, "unreachable": 4, "timed_out": 6}


async def test_an_owner_no_one_serves_ends_the_search_at_once_with_its_buckets_unreachable() -> None:
    """The snapshot still names the dead owner (its leases have not expired), but NATS answers "no
    responders" to the scatter: its buckets are unreachable at once, and the search ends as soon as
    the live owner's tallies are in, not at the deadline."""
    bus = Bus()
    owner(bus, "a", {0: (["i1"], 1)}, tally_after=0.1)
    snapshot = {
        0: BucketSnapshot(0, "a", 1, 2),
        1: BucketSnapshot(1, "dead", 4, 3),
        2: BucketSnapshot(2, "dead", 7, 4),
    }
    gone: list[str] = []
    updates: list[SearchUpdate] = []
    started = time.monotonic()
    batches, summary = await run(bus, snapshot, timeout=5.0, live={"a", "dead"}, updates=updates, gone=gone)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"waited {elapsed:.2f}s for an owner NATS said no one serves"
    assert gone == ["dead"]
    assert [i for b in batches for i in b] == ["i1"]
    assert summary == {"queried": 9, "matched": 1, "not_matched": 1, "unreachable": 7, "timed_out": 0}
    assert balanced(summary)
    answered = [u.answered for u in updates]
    assert answered == sorted(answered) and all(u.queried == 9 for u in updates)


async def test_a_search_whose_every_owner_is_gone_ends_at_once_all_unreachable() -> None:
    bus = Bus()
    snapshot = {
        0: BucketSnapshot(0, "x", 1, 5),
        1: BucketSnapshot(1, "y", 2, 6),
        2: BucketSnapshot(2, None, 0, 1),
    }
    gone: list[str] = []
    started = time.monotonic()
    batches, summary = await run(bus, snapshot, timeout=5.0, live={"x", "y"}, gone=gone)
    assert time.monotonic() - started < 1.0
    assert batches == [] and sorted(gone) == ["x", "y"]
    assert summary == {"queried": 12, "matched": 0, "not_matched": 0, "unreachable": 12, "timed_out": 0}


async def test_a_bucket_no_one_owns_does_not_hold_the_search_to_its_deadline() -> None:
    """Between an owner's expiry and the takeover its buckets have no live owner: unreachable from
    the start, and the search ends with the owned buckets' tallies."""
    bus = Bus()
    owner(bus, "a", {0: (["i1"], 1)})
    snapshot = {0: BucketSnapshot(0, "a", 1, 2), 1: BucketSnapshot(1, None, 3, 3)}
    started = time.monotonic()
    batches, summary = await run(bus, snapshot, timeout=5.0)
    assert time.monotonic() - started < 1.0
    assert batches == [["i1"]]
    assert summary == {"queried": 5, "matched": 1, "not_matched": 1, "unreachable": 3, "timed_out": 0}


async def test_each_owner_gets_its_own_reply_subject_under_the_searchs_inbox() -> None:
    seen: dict[str, str] = {}
    bus = Bus()
    for name in ("a", "b"):
        owner(bus, name, {0: ([], 1), 1: ([], 1)})
        served = bus.handlers[f"p.search.{name}"]

        async def recording(message: Message, name: str = name, served: Handler = served) -> None:
            seen[name] = json.loads(message.data)["reply"]
            await served(message)

        bus.handlers[f"p.search.{name}"] = recording
    _, summary = await run(bus, {0: BucketSnapshot(0, "a", 1, 1), 1: BucketSnapshot(1, "b", 1, 1)})
    assert seen == {"a": "inbox.1.a", "b": "inbox.1.b"}
    assert summary["not_matched"] == 2 and "inbox.1.*" in bus.handlers


def test_an_owner_lost_after_its_tally_changes_nothing_and_is_counted_once() -> None:
    tally = ClusterSearchTally({0: BucketSnapshot(0, "a", 1, 2), 1: BucketSnapshot(1, "a", 1, 3)})
    tally.on_tally(BucketTally(0, 1, 2, 1, 1, 0, 0))
    tally.on_owner_lost("a")
    tally.on_owner_lost("a")
    assert tally.complete
    assert tally.on_matches(1, 1, ["late"]) == []
    assert tally.summary() == {"queried": 5, "matched": 1, "not_matched": 1, "unreachable": 3, "timed_out": 0}
    assert tally.progress() == (5, 5)


@pytest.mark.nats
async def test_on_a_real_nats_server_an_owner_with_no_subscription_is_reported_at_once() -> None:
    """What gather relies on: nats-py asks the server for "no responders", and a subscription's
    callback gets it as a message with headers {"Status": "503"} on the reply subject."""
    if not nats_reachable():
        pytest.skip("NATS is not reachable on 127.0.0.1:4222")
    import nats

    prefix = f"test{secrets.token_hex(6)}"
    nc = await nats.connect(NATS_URL)
    try:

        async def serve(message: Any) -> None:  # owner "a": one bucket, one match
            request = json.loads(message.data)
            body = {"t": "matches", "b": 0, "k": 1, "ids": ["i1"], "a": 1}
            await nc.publish(request["reply"], json.dumps(body).encode())
            await nc.publish(
                request["reply"], json.dumps(BucketTally(0, 1, 2, 1, 1, 0, 0).to_json()).encode()
            )

        served = await nc.subscribe(f"{prefix}.search.a", cb=serve)

        async def subscribe(subject: str, callback: Any, fail: Any) -> Any:
            subscription = await nc.subscribe(subject, cb=callback)
            await nc.flush()
            return subscription

        gone: list[str] = []
        ids: list[str] = []
        summary: dict[str, int] = {}
        snapshot = {0: BucketSnapshot(0, "a", 1, 2), 1: BucketSnapshot(1, "dead", 3, 4)}
        started = time.monotonic()
        async for item in gather(
            snapshot, b"need", 5.0, prefix=prefix, inbox=f"{prefix}.reply.x", subscribe=subscribe,
            publish=nc.publish, on_owner_gone=gone.append,
        ):  # fmt: skip
            if isinstance(item, dict):
                summary = item
            else:
                ids.extend(item.ids)
        elapsed = time.monotonic() - started
        print(f"\nno responders: the search ended after {elapsed * 1000:.1f} ms (deadline 5 s)")
        assert elapsed < 1.0 and gone == ["dead"] and ids == ["i1"]
        assert summary == {"queried": 6, "matched": 1, "not_matched": 1, "unreachable": 4, "timed_out": 0}
        await served.unsubscribe()
    finally:
        await nc.close()


async def test_a_replica_that_fell_behind_fails_the_search_loudly() -> None:
    bus = Bus()

    async def overloaded(message: Message) -> None:
        request = json.loads(message.data)
        await bus.publish(request["reply"], b'{"t": "slow"}')

    bus.handlers["p.search.a"] = overloaded
    with pytest.raises(Unavailable):
        await run(bus, {0: BucketSnapshot(0, "a", 1, 3)})


async def test_replies_after_the_deadline_are_not_counted_while_the_ep_reads_the_last_batch() -> None:
    """A batch and a tally landing after the deadline, while the EP is still reading (the generator
    suspended in its yield), must not reach the summary: it adds up to exactly the ids sent."""
    bus = Bus()
    owner(bus, "a", {0: (["i1"], 1)})

    async def late(message: Message) -> None:
        request = json.loads(message.data)
        await asyncio.sleep(0.3)  # past the 0.2 s deadline, while the EP still reads
        body = {"t": "matches", "b": 1, "k": 4, "ids": ["late"], "a": 1}
        await bus.publish(request["reply"], json.dumps(body).encode())
        await bus.publish(request["reply"], json.dumps(BucketTally(1, 4, 2, 1, 1, 0, 0).to_json()).encode())

    bus.handlers["p.search.b"] = late
    snapshot = {0: BucketSnapshot(0, "a", 1, 2), 1: BucketSnapshot(1, "b", 4, 2)}
    ids: list[str] = []
    summary: dict[str, int] = {}
    async for item in gather(
        snapshot, b"need", 0.2, prefix="p", inbox="inbox.1", subscribe=bus.subscribe, publish=bus.publish
    ):
        if isinstance(item, dict):
            summary = item
        else:
            ids.extend(item.ids)
            await asyncio.sleep(0.5)  # a slow EP: the late replies land meanwhile
    assert ids == ["i1"]
    assert summary == {"queried": 4, "matched": 1, "not_matched": 1, "unreachable": 0, "timed_out": 2}


def test_a_late_tally_or_batch_of_a_settled_bucket_changes_nothing() -> None:
    tally = ClusterSearchTally({0: BucketSnapshot(0, "a", 1, 2)})
    tally.on_tally(BucketTally(0, 1, 2, 1, 1, 0, 0))
    assert tally.on_matches(0, 1, ["late"]) == []
    tally.on_tally(BucketTally(0, 1, 2, 2, 0, 0, 0))
    assert tally.summary()["matched"] == 1


def test_claimed_instances_an_owner_holds_no_stream_for_yet_count_as_unreachable() -> None:
    tally = ClusterSearchTally({0: BucketSnapshot(0, "a", 1, 5)})
    tally.on_tally(BucketTally(0, 1, 3, 1, 2, 0, 0))  # it linked 3 of the 5 claimed so far
    assert tally.summary() == {"queried": 5, "matched": 1, "not_matched": 2, "unreachable": 2, "timed_out": 0}


async def test_replies_lost_on_the_inbox_fail_the_search_even_when_every_tally_arrives() -> None:
    """A slow consumer dropped a `matches` batch: the tallies alone would give an exact-looking summary
    over a short match set, so the search ends with the error instead of a summary."""

    class LossyBus(Bus):
        lost = False

        async def publish(self, subject: str, data: bytes, *, reply: str = "") -> None:
            if subject.startswith("inbox.1.") and json.loads(data)["t"] == "matches" and not self.lost:
                self.lost = True  # what the node does on nats-py's SlowConsumerError for the inbox
                self.fail_for(subject)(Unavailable("lost", reason="SEARCH_INCOMPLETE"))
                return
            await super().publish(subject, data, reply=reply)

    bus = LossyBus()
    owner(bus, "a", {0: (["i1", "i2"], 1)})
    with pytest.raises(Unavailable) as caught:
        await run(bus, {0: BucketSnapshot(0, "a", 1, 3)})
    assert caught.value.reason == "SEARCH_INCOMPLETE" and bus.lost


async def test_progress_adds_up_the_buckets_never_decreases_and_ends_at_the_answers() -> None:
    bus = Bus()
    owner(bus, "a", {0: (["i1", "i2"], 3)})
    owner(bus, "b", {1: ([], 2)}, tally_after=0.2)  # no match: its tally is the only news, later
    owner(bus, "slow", {2: ([], 0)}, tally=False)  # its 4 instances never answer
    snapshot = {
        0: BucketSnapshot(0, "a", 5, 5),
        1: BucketSnapshot(1, "b", 2, 2),
        2: BucketSnapshot(2, "slow", 1, 4),
    }
    updates: list[SearchUpdate] = []
    batches, summary = await run(bus, snapshot, timeout=0.8, live={"a", "b", "slow"}, updates=updates)
    assert sorted(i for b in batches for i in b) == ["i1", "i2"]
    assert all(u.queried == 11 for u in updates)
    answered = [u.answered for u in updates]
    assert answered == sorted(answered) and answered[-1] <= 11
    # The buckets' tallies came without a match: the last update says so, with no ids.
    assert updates[-1].ids == [] and updates[-1].answered == 7
    assert summary["queried"] - summary["timed_out"] == 7


def test_the_progress_of_a_bucket_is_the_most_any_message_reported() -> None:
    tally = ClusterSearchTally({0: BucketSnapshot(0, "a", 1, 6), 1: BucketSnapshot(1, "b", 1, 4)})
    assert tally.progress() == (0, 10)
    tally.on_matches(0, 1, ["i1"], answered=3)
    assert tally.progress() == (3, 10)
    tally.on_matches(0, 1, ["i2"], answered=2)  # an older count arriving late does not go back
    assert tally.progress() == (3, 10)
    tally.on_matches(1, 2, ["x"], answered=4)  # under another token: not counted
    assert tally.progress() == (3, 10)
    tally.on_tally(BucketTally(0, 1, 6, 2, 3, 0, 1))  # one timed out
    assert tally.progress() == (5, 10)
