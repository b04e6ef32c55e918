"""The sink's Prometheus metrics (`--metrics-listen`): readings stored, de-duplicated and refused.

The writer counts what it commits; refusals (a Publish stream rejected by authentication or
by a bad reading) are counted by their ErrorInfo reason, a small fixed set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from eddie_common.errors import DomainError
from eddie_common.interceptors import Authenticator
from eddie_common.metrics import MetricsEndpoint, MetricsInterceptor, RpcMetrics
from eddie_sink.writer import ReadingWriter

PUBLISH = "/eddie.framework.v1.DataSinkService/Publish"


class SinkCollector(Collector):
    def __init__(self, writer: ReadingWriter, refused: Counter[str]) -> None:
        self.writer = writer
        self.refused = refused

    def collect(self) -> Iterable[Metric]:
        writer = self.writer
        yield CounterMetricFamily("sink_readings_stored", "new readings stored", value=writer.stored_readings)
        yield CounterMetricFamily(
            "sink_readings_deduplicated",
            "readings received again and not stored twice",
            value=writer.committed_readings - writer.stored_readings,
        )
        refused = CounterMetricFamily(
            "sink_publish_refused", "Publish streams refused, by ErrorInfo reason", labels=["reason"]
        )
        for reason, count in sorted(self.refused.items()):
            refused.add_metric([reason], count)
        yield refused


class SinkMetrics:
    """The registry, the gRPC interceptor, the refusal counts and the /metrics endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc = RpcMetrics(self.registry)
        self.interceptor = MetricsInterceptor(self.rpc)
        self.refused: Counter[str] = Counter()
        self.endpoint = MetricsEndpoint(self.registry)

    def watch(self, writer: ReadingWriter) -> None:
        self.registry.register(SinkCollector(writer, self.refused))

    def counting_refusals(self, authenticate: Authenticator) -> Authenticator:
        """`authenticate`, counting the Publish calls it refuses by reason."""

        async def counted(method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> Any:
            try:
                return await authenticate(method, metadata)
            except DomainError as exc:
                if method == PUBLISH:
                    self.refused[exc.reason] += 1
                raise

        return counted

    def on_refused(self, reason: str) -> None:
        self.refused[reason] += 1
