"""The tally of one search: counts the answers and hands matched ids out in batches.

A reply costs a set removal, a counter and, for a match, one list append; the
streaming side is woken through one future only while it is actually waiting.
No queue, task or timer per instance.

Progress (`answered` of `queried`) rides on the batches that go out anyway. While
no match arrives, one timer per wait lets the stream send a progress-only update
when the count has changed, at most one every PROGRESS_INTERVAL: a search whose
AIIDAs answer at once sends none, and one waiting for stragglers sends a few
rather than one message per answer (issue 13 wants few messages per search).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

# The least time between two messages of a search when the second carries only progress (no ids).
PROGRESS_INTERVAL = 0.2


@dataclass(frozen=True, slots=True)
class SearchUpdate:
    """Matched ids new since the previous update (none: progress only) and the running counts."""

    ids: list[str]
    answered: int  # matched + not matched + unreachable so far
    queried: int


@dataclass
class SearchTally:
    """Counts the answers of one search as they arrive; matched ids are streamed in batches."""

    query_id: str
    asked: set[str] = field(default_factory=set)
    queried: int = 0
    matched: int = 0
    not_matched: int = 0
    unreachable: int = 0
    matched_ids: list[str] = field(default_factory=list)
    closed: bool = False
    _expired: bool = False
    _sent: int = 0
    _answered_sent: int = -1
    _waiter: asyncio.Future[None] | None = None

    @property
    def pending(self) -> int:
        return len(self.asked)

    @property
    def answered(self) -> int:
        """Instances accounted for so far: matched, not matched or unreachable (never above `queried`)."""
        return self.matched + self.not_matched + self.unreachable

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def on_reply(self, instance_id: str, matched: bool) -> bool:
        """Records one answer; False (and nothing recorded) for a second answer or one not asked for."""
        asked = self.asked
        if instance_id not in asked or self.closed:
            return False
        asked.remove(instance_id)
        if matched:
            self.matched += 1
            self.matched_ids.append(instance_id)
            self._wake()
        else:
            self.not_matched += 1
        if not asked:
            self.closed = True
            self._wake()
        return True

    def on_lost(self, instance_id: str) -> None:
        """The instance's stream broke (or its queue was full) before it answered."""
        if self.closed or instance_id not in self.asked:
            return
        self.asked.discard(instance_id)
        self.unreachable += 1
        if not self.asked:
            self.closed = True
            self._wake()

    def close(self) -> int:
        """Ends the search; returns how many asked instances timed out. Late replies are dropped."""
        timed_out = len(self.asked)
        self.asked.clear()
        self.closed = True
        self._wake()
        return timed_out

    def _expire(self) -> None:
        self._expired = True
        self._wake()

    def _take(self) -> list[str]:
        batch = self.matched_ids[self._sent :]
        self._sent = len(self.matched_ids)
        self._answered_sent = self.answered
        return batch

    def update(self, ids: list[str]) -> SearchUpdate:
        """`ids` with the counts as they are now."""
        return SearchUpdate(ids, self.answered, self.queried)

    async def batches(
        self, deadline: float, progress_interval: float | None = None
    ) -> AsyncIterator[list[str]]:
        """Yields the matched ids not yet handed out, until the search is over.

        `deadline` is on the event loop's clock. The consumer resumes this generator once it
        has written the previous batch; every id that arrived meanwhile is in the next one,
        so the first match leaves at once and a broad search needs a handful of messages.
        One timer for the whole search ends the stream at the deadline; the caller then
        closes the tally (`close`), which counts who has not answered as timed out.

        With `progress_interval`, an empty batch (progress only; the consumer reads `answered`)
        is yielded when the count has changed and that long has passed since the last yield.
        """
        loop = asyncio.get_running_loop()
        timer = loop.call_at(deadline, self._expire)
        next_tick = loop.time() + (progress_interval or 0.0)
        try:
            while True:
                if self._sent < len(self.matched_ids):
                    yield self._take()
                    next_tick = loop.time() + (progress_interval or 0.0)
                elif self.closed or self._expired:
                    return
                elif progress_interval is not None and loop.time() >= next_tick:
                    if self.answered != self._answered_sent:
                        self._answered_sent = self.answered
                        yield []
                    next_tick = loop.time() + progress_interval
                else:
                    self._waiter = loop.create_future()
                    tick = None if progress_interval is None else loop.call_at(next_tick, self._wake)
                    try:
                        await self._waiter
                    finally:
                        if tick is not None:
                            tick.cancel()
        finally:
            timer.cancel()
            self._waiter = None
