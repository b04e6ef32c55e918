"""The marketplace's Prometheus metrics (`--metrics-listen`), read from its state at scrape time.

Nothing here is on a hot path: connected instances and open consent streams are counted when
Prometheus scrapes, the outbox and the permissions by state are two small queries right before
the scrape, and a search adds one histogram observation when it ends. The database statements
this process sends are one counter increment each; in cluster mode the NATS client's own
message and byte counts are read at scrape time (what `make bench --cluster` divides per search).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event, false, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import access_pb2, data_request_pb2
from eddie_common.metrics import MetricsEndpoint, MetricsInterceptor, RpcMetrics
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.db.models import Base, OutboxRow, PermissionRow
from marketplace_server.services.events import EventHub

# The first word of a statement and the first table it names (bounded labels: this schema's
# tables); anything else counts as "other".
STATEMENT_VERBS = ("select", "insert", "update", "delete")
STATEMENT_TABLES = frozenset(Base.metadata.tables)
_TABLE = re.compile(r'\b(?:FROM|INTO|UPDATE)\s+"?(?:\w+"?\."?)?(\w+)', re.IGNORECASE)
SEARCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60)
ANSWER_KINDS = ("matched", "not_matched", "unreachable", "timed_out")
PERMISSION_STATES = {
    value: name.removeprefix("STATE_").lower()
    for name, value in access_pb2.Permission.State.items()
    if value != access_pb2.Permission.STATE_UNSPECIFIED
}


class MarketplaceMetrics:
    """The registry, the gRPC interceptor and the marketplace's own families."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc = RpcMetrics(self.registry)
        self.interceptor = MetricsInterceptor(self.rpc)
        r = self.registry
        self.connected = Gauge(
            "marketplace_connected_instances", "AIIDAs with a live Connect stream", registry=r
        )
        self.consent_streams = Gauge(
            "marketplace_consent_streams_open", "open consent and permission-watch streams", registry=r
        )
        self.search_seconds = Histogram(
            "marketplace_search_seconds", "duration of searches, from the call to the summary",
            buckets=SEARCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.search_answers = Counter(
            "marketplace_search_answers", "AIIDA answers to searches, by kind", ["kind"], registry=r
        )
        self.searches_withheld = Counter(
            "marketplace_searches_withheld", "searches whose matches were withheld (below --min-match-set)",
            registry=r,
        )  # fmt: skip
        self.cluster_searches_incomplete = Counter(
            "marketplace_cluster_searches_incomplete",
            "cluster searches failed with SEARCH_INCOMPLETE (replies lost: NATS slow consumer or disconnect)",
            registry=r,
        )
        self.cluster_events_repaired = Counter(
            "marketplace_cluster_events_repaired",
            "permission events queued on streams from the database because their NATS publish was lost",
            registry=r,
        )
        self.outbox_pending = Gauge(
            "marketplace_outbox_pending", "deliveries to AIIDAs not acknowledged yet", registry=r
        )
        self.outbox_oldest = Gauge(
            "marketplace_outbox_oldest_age_seconds", "age of the oldest unacknowledged delivery", registry=r
        )
        self.permissions = Gauge("marketplace_permissions", "permissions by state", ["state"], registry=r)
        self.db_statements = Counter(
            "marketplace_db_statements", "SQL statements sent to the database, by first word and table",
            ["verb", "table"], registry=r,
        )  # fmt: skip
        self._answers = {kind: self.search_answers.labels(kind) for kind in ANSWER_KINDS}
        self.endpoint = MetricsEndpoint(self.registry)

    def watch_database(self, engine: AsyncEngine) -> None:
        """Counts every statement the engine sends (an executemany counts once)."""
        children: dict[tuple[str, str], Any] = {}

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def _count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            labels = statement_labels(statement)
            child = children.get(labels)
            if child is None:
                child = children[labels] = self.db_statements.labels(*labels)
            child.inc()

    def watch_nats(self, nc: Any) -> None:
        """Cluster mode: the NATS client's messages and bytes in and out (nats-py `Client.stats`)."""
        self.registry.register(NatsStats(nc))

    def watch(
        self, manager: ConnectionManager, hub: EventHub, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        """Reads the live parts at scrape time and the database right before it."""
        self.connected.set_function(lambda: manager.connected_count)
        self.consent_streams.set_function(hub.open_streams)

        async def refresh() -> None:
            await self._refresh(sessions)

        self.endpoint.refreshers.append(refresh)

    def on_search(self, summary: data_request_pb2.SearchSummary) -> None:
        self.search_seconds.observe(summary.elapsed.ToNanoseconds() / 1e9)
        if summary.withheld:
            self.searches_withheld.inc()
        for kind in ANSWER_KINDS:
            count = getattr(summary, kind)
            if count:
                self._answers[kind].inc(count)

    async def _refresh(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions() as session:
            pending, oldest = (
                await session.execute(
                    select(func.count(), func.min(OutboxRow.create_time)).where(OutboxRow.done == false())
                )
            ).one()
            states = dict(
                (
                    await session.execute(
                        select(PermissionRow.state, func.count()).group_by(PermissionRow.state)
                    )
                )
                .tuples()
                .all()
            )
        self.outbox_pending.set(pending)
        self.outbox_oldest.set((datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0)
        for value, name in PERMISSION_STATES.items():
            self.permissions.labels(name).set(states.get(value, 0))


@functools.lru_cache(maxsize=1024)
def statement_labels(statement: str) -> tuple[str, str]:
    """(verb, table) of a SQL statement: its first word and the first of this schema's tables it
    reads or writes (`other` for anything else), e.g. ("update", "bucket_leases")."""
    head = statement.lstrip(" \t\r\n(").split(None, 1)
    verb = head[0].lower() if head else ""
    match = _TABLE.search(statement)
    table = match.group(1).lower() if match else ""
    return (
        verb if verb in STATEMENT_VERBS else "other",
        table if table in STATEMENT_TABLES else "other",
    )


class NatsStats(Collector):
    """`marketplace_nats_messages_total{direction}` and `marketplace_nats_bytes_total{direction}`,
    read from the client's counters at scrape time (payload bytes, as nats-py counts them)."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.nc.stats
        messages = CounterMetricFamily(
            "marketplace_nats_messages", "NATS messages this replica published (out) and received (in)",
            labels=["direction"],
        )  # fmt: skip
        payload = CounterMetricFamily(
            "marketplace_nats_bytes", "NATS payload bytes this replica published (out) and received (in)",
            labels=["direction"],
        )  # fmt: skip
        for direction in ("in", "out"):
            messages.add_metric([direction], float(stats.get(f"{direction}_msgs", 0)))
            payload.add_metric([direction], float(stats.get(f"{direction}_bytes", 0)))
        yield messages
        yield payload
