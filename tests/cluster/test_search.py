"""The cluster search's gather: every claimed instance counted once, whatever the owners do."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from eddie_common.errors import Unavailable
from marketplace_server.aiida.fanout import SearchUpdate
from marketplace_server.cluster.search import BucketSnapshot, BucketTally, ClusterSearchTally, gather

Handler = Callable[[Any], Awaitable[None]]


class Message:
    def __init__(self, subject: str, data: bytes) -> None:
        self.subject, self.data = subject, data


class Bus:
    """An in-memory stand-in for NATS subjects (the owners' behaviour is what is under test)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.fail: dict[str, Callable[[BaseException], None]] = {}

    async def subscribe(self, subject: str, handler: Handler, fail: Callable[[BaseException], None]) -> None:
        self.handlers[subject] = handler
        self.fail[subject] = fail

    async def publish(self, subject: str, data: bytes) -> None:
        handler = self.handlers.get(subject)
        if handler is not None:
            task = asyncio.create_task(handler(Message(subject, data)))
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

        async def publish(self, subject: str, data: bytes) -> None:
            if subject == "inbox.1" and json.loads(data)["t"] == "matches" and not self.lost:
                self.lost = True  # what the node does on nats-py's SlowConsumerError for the inbox
                self.fail[subject](Unavailable("lost", reason="SEARCH_INCOMPLETE"))
                return
            await super().publish(subject, data)

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
