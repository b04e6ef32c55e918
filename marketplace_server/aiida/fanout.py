"""Fan-out of one search query over the instances' Connect streams, and its tally."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class SearchTally:
    """Counts the answers of one search as they arrive; matches are queued for streaming."""

    query_id: str
    asked: set[str] = field(default_factory=set)
    queried: int = 0
    matched: int = 0
    not_matched: int = 0
    unreachable: int = 0
    matches: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    matched_ids: list[str] = field(default_factory=list)
    closed: bool = False

    @property
    def pending(self) -> int:
        return len(self.asked)

    def _settle(self) -> None:
        if not self.asked and not self.closed:
            self.closed = True
            self.matches.put_nowait(None)

    def on_reply(self, instance_id: str, matched: bool) -> None:
        """Records one answer; a second answer or one not asked for is dropped."""
        if self.closed or instance_id not in self.asked:
            return
        self.asked.discard(instance_id)
        if matched:
            self.matched += 1
            self.matched_ids.append(instance_id)
            self.matches.put_nowait(instance_id)
        else:
            self.not_matched += 1
        if not self.asked:
            self._settle()

    def on_lost(self, instance_id: str) -> None:
        """The instance's stream broke (or its queue was full) before it answered."""
        if self.closed or instance_id not in self.asked:
            return
        self.asked.discard(instance_id)
        self.unreachable += 1
        if not self.asked:
            self._settle()

    def close(self) -> int:
        """Ends the search; returns how many asked instances timed out. Late replies are dropped."""
        timed_out = len(self.asked)
        self.asked.clear()
        if not self.closed:
            self.closed = True
            self.matches.put_nowait(None)
        return timed_out
