"""The AIIDA's Prometheus metrics (`--metrics-listen`), one set per process (one device or a fleet).

Readings published, failed deliveries and dropped readings are plain counters the streamers
keep (`StreamStats`); accesses by state and the instances are counted when Prometheus scrapes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aiida_stub.instance import AiidaInstance
from aiida_stub.state import State
from aiida_stub.streamer import StreamStats
from eddie_common.metrics import MetricsEndpoint, MetricsInterceptor, RpcMetrics

ACCESS_STATES = [name for name in State.keys() if name != "STATE_UNSPECIFIED"]  # noqa: SIM118


class AiidaCollector(Collector):
    """Reads the streamers' counters and the instances' accesses at scrape time."""

    def __init__(self, stats: StreamStats, instances: Mapping[str, AiidaInstance]) -> None:
        self.stats = stats
        self.instances = instances

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "aiida_readings_published", "readings acknowledged by sinks", value=self.stats.published
        )
        yield CounterMetricFamily(
            "aiida_readings_dropped",
            "readings lost to a full backlog (sink away too long)",
            value=self.stats.dropped,
        )
        failures = CounterMetricFamily(
            "aiida_publish_failures", "failed deliveries to sinks, by gRPC status", labels=["code"]
        )
        for code, count in sorted(self.stats.failures.items()):
            failures.add_metric([code], count)
        yield failures
        yield GaugeMetricFamily(
            "aiida_instances", "AIIDA instances in this process", value=len(self.instances)
        )
        by_state: Counter[str] = Counter(
            State.Name(access.state) for i in self.instances.values() for access in i.record.accesses.values()
        )
        accesses = GaugeMetricFamily("aiida_accesses", "data accesses by state", labels=["state"])
        for name in ACCESS_STATES:
            accesses.add_metric([name.removeprefix("STATE_").lower()], by_state.get(name, 0))
        yield accesses


class AiidaMetrics:
    """The registry, the gRPC interceptor and the /metrics endpoint of one process."""

    def __init__(self, stats: StreamStats, instances: Mapping[str, AiidaInstance]) -> None:
        self.registry = CollectorRegistry()
        self.rpc = RpcMetrics(self.registry)
        self.interceptor = MetricsInterceptor(self.rpc)
        self.registry.register(AiidaCollector(stats, instances))
        self.endpoint = MetricsEndpoint(self.registry)
