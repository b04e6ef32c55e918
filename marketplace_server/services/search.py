"""Workflow 5: the fan-out search over the AIIDA streams, and the stored searches.

The data need goes to every claimed, connected instance at once; each AIIDA
answers with one bit. Matches stream back as they arrive; the summary comes
last, after the search is stored, so RequestAccess can rely on it at once.
Every `matches` message carries the running `answered` / `queried`. A caller that
asks for `progress` also gets progress-only messages (no ids), only when the count
changed and at most one every PROGRESS_INTERVAL (see `aiida.fanout`); without it
every `matches` message carries ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import data_request_pb2
from eddie_common.logging import log_event
from marketplace_server.aiida.fanout import PROGRESS_INTERVAL, SearchUpdate
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.auth import principal, require_eligible_party
from marketplace_server.clock import to_duration, to_timestamp, utcnow
from marketplace_server.config import Config
from marketplace_server.db.match_sets import search_match_ids, store_matches
from marketplace_server.db.models import DataRequestRow, SearchRow
from marketplace_server.errors import InvalidArgument, NotFound
from marketplace_server.ratelimit import Limiter, RateLimiter
from marketplace_server.resources import (
    ensure_owned_open,
    load_data_request,
    parse_data_request_name,
    parse_search_name,
    search_name,
)
from marketplace_server.security import new_id

log = logging.getLogger(__name__)

# A search's output: batches of matched ids (with the running counts) as they arrive, then the counts
# of the summary.
Results = AsyncGenerator[SearchUpdate | dict[str, int], None]


class ClusterSearch(Protocol):
    """A search across the replicas' streams (`ClusterNode.search`)."""

    def search(self, data_need: energy_pb2.DataNeed, timeout: float) -> Results: ...


class SearchService:
    """Runs searches for the owners of data requests and keeps their results."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], manager: ConnectionManager, config: Config
    ) -> None:
        self.sessions = sessions
        self.manager = manager
        self.config = config
        # Searches per account; in cluster mode the server swaps in the database-backed limiter.
        self.limiter: Limiter = RateLimiter(config.search_rate_per_minute)
        self.cluster: ClusterSearch | None = None  # set in cluster mode (marketplace_server.cluster.node)
        # Called with every summary (the metrics); they must not block.
        self.observers: list[Callable[[data_request_pb2.SearchSummary], None]] = []

    def _timeout(self, request: data_request_pb2.SearchInstancesRequest, remaining: float | None) -> float:
        timeout = self.config.search_timeout_default
        if request.HasField("timeout"):
            t = request.timeout
            if t.seconds < 0 or t.nanos < 0 or t.nanos > 999_999_999:
                raise InvalidArgument.for_field("timeout", "must be a non-negative duration")
            value = t.seconds + t.nanos / 1e9
            if not 0.1 <= value <= self.config.search_timeout_max:
                raise InvalidArgument.for_field(
                    "timeout", f"must be between 0.1 s and {self.config.search_timeout_max:g} s"
                )
            timeout = value
        if remaining is not None:
            # Leave time to send the summary before the caller's own deadline.
            timeout = max(0.0, min(timeout, remaining - 0.05))
        return timeout

    async def _load_owned_open(self, data_request_id: str) -> DataRequestRow:
        caller = require_eligible_party()
        async with self.sessions() as session:
            row, _ = await load_data_request(session, data_request_id)
        ensure_owned_open(row, caller.account_id, "search it")
        return row

    async def search(
        self, request: data_request_pb2.SearchInstancesRequest, remaining: float | None
    ) -> AsyncIterator[data_request_pb2.SearchInstancesResponse]:
        started = time.perf_counter()
        data_request_id = parse_data_request_name(request.data_request, "data_request")
        timeout = self._timeout(request, remaining)
        row = await self._load_owned_open(data_request_id)
        await self.limiter.acquire(f"account:{row.owner_id}", what="searches")
        need = energy_pb2.DataNeed.FromString(row.data_need)
        floor = MatchFloor(self.config.min_match_set)
        remaining_time = timeout - (time.perf_counter() - started)
        source: Results
        if self.cluster is None:
            source = self._local(need, remaining_time, request.progress)
        else:
            source = self.cluster.search(need, max(0.0, remaining_time))
        matched_ids: list[str] = []
        counts: dict[str, int] = {}
        loop = asyncio.get_running_loop()
        last_sent, answered_sent = loop.time(), -1
        async with contextlib.aclosing(source):
            async for item in source:
                if isinstance(item, dict):
                    counts = item
                    continue
                matched_ids.extend(item.ids)
                released = floor.admit(item.ids)
                if not released:  # progress only (or ids the floor holds back): only when it says something
                    if not request.progress or item.answered == answered_sent:
                        continue
                    if item.ids and loop.time() - last_sent < PROGRESS_INTERVAL:
                        continue  # a held batch goes out no sooner than a progress message would
                yield data_request_pb2.SearchInstancesResponse(
                    matches=data_request_pb2.InstanceMatches(
                        instance_ids=released, answered=item.answered, queried=item.queried
                    )
                )
                last_sent, answered_sent = loop.time(), item.answered
        summary = data_request_pb2.SearchSummary(
            queried=counts["queried"],
            matched=counts["matched"],
            not_matched=counts["not_matched"],
            unreachable=counts["unreachable"],
            timed_out=counts["timed_out"],
            withheld=floor.withholds(counts["matched"]),
        )
        elapsed = time.perf_counter() - started
        summary.search = await self._store(data_request_id, matched_ids, summary, elapsed)
        summary.elapsed.CopyFrom(to_duration(time.perf_counter() - started))
        log_event(
            log,
            "search_finished",
            data_request=data_request_id,
            queried=summary.queried,
            matched=summary.matched,
            unreachable=summary.unreachable,
            timed_out=summary.timed_out,
            elapsed_ms=int(summary.elapsed.ToMilliseconds()),
        )
        for observe in self.observers:
            observe(summary)
        yield data_request_pb2.SearchInstancesResponse(summary=summary)

    async def _local(self, need: energy_pb2.DataNeed, timeout: float, progress: bool) -> Results:
        """This process's fan-out: batches of matched ids, then the counts (as a cluster search)."""
        tally = self.manager.begin_search(need)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async for batch in tally.batches(deadline, PROGRESS_INTERVAL if progress else None):
                yield tally.update(batch)
        finally:
            timed_out = self.manager.end_search(tally)
        yield {
            "queried": tally.queried,
            "matched": tally.matched,
            "not_matched": tally.not_matched,
            "unreachable": tally.unreachable,
            "timed_out": timed_out,
        }

    async def _store(
        self,
        data_request_id: str,
        matched_ids: list[str],
        summary: data_request_pb2.SearchSummary,
        elapsed: float,
    ) -> str:
        search_id = new_id()
        async with self.sessions.begin() as session:
            session.add(
                SearchRow(
                    id=search_id,
                    data_request_id=data_request_id,
                    create_time=utcnow(),
                    queried=summary.queried,
                    matched=summary.matched,
                    not_matched=summary.not_matched,
                    unreachable=summary.unreachable,
                    timed_out=summary.timed_out,
                    elapsed_ms=int(elapsed * 1000),
                    withheld=summary.withheld,
                )
            )
            await session.flush()
            if matched_ids and not summary.withheld:
                # The match set in chunks of sorted ids (db.match_sets), one executemany: a row per
                # matched instance cost more CPU than the fan-out did at 10,000 instances.
                await store_matches(session, search_id, matched_ids)
        return search_name(data_request_id, search_id)

    async def get_search(self, name: str) -> data_request_pb2.Search:
        data_request_id, search_id = parse_search_name(name)
        caller = principal()
        async with self.sessions() as session:
            row = await session.get(SearchRow, search_id)
            owner = await session.scalar(
                select(DataRequestRow.owner_id).where(DataRequestRow.id == data_request_id)
            )
            if row is None or row.data_request_id != data_request_id or owner != caller.account_id:
                raise NotFound("search not found", reason="SEARCH_NOT_FOUND")
            ids = await search_match_ids(session, search_id)
        summary = data_request_pb2.SearchSummary(
            search=name,
            queried=row.queried,
            matched=row.matched,
            not_matched=row.not_matched,
            unreachable=row.unreachable,
            timed_out=row.timed_out,
            elapsed=to_duration(row.elapsed_ms / 1000),
            withheld=row.withheld,
        )
        return data_request_pb2.Search(
            name=name, matched_instance_ids=ids, summary=summary, create_time=to_timestamp(row.create_time)
        )


class MatchFloor:
    """The singling-out floor: matches are held back until K have arrived, then stream live.

    A search matching fewer than K instances (but some) would let an EP single out and, by
    repeating narrow queries, profile one pseudonymous household; its ids are never sent nor stored.
    """

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum
        self.held: list[str] = []
        self.released = minimum <= 1

    def admit(self, batch: list[str]) -> list[str]:
        """The ids that may be sent now (held ones included once the floor is reached)."""
        if self.released:
            return batch
        self.held.extend(batch)
        if len(self.held) < self.minimum:
            return []
        self.released = True
        released, self.held = self.held, []
        return released

    def withholds(self, matched: int) -> bool:
        return 0 < matched < self.minimum


__all__ = ["MatchFloor", "SearchService"]
