"""Reading a program's /metrics (`--metrics-listen`) from the benchmarks."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def parse_counters(text: str) -> dict[str, float]:
    """Prometheus text -> {`name{label="v",...}`: value} for every sample (labels sorted)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return values


def scrape(address: str, timeout: float = 10.0) -> dict[str, float]:
    """Every sample `HOST:PORT/metrics` serves (blocking: call it in a thread from async code)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        return parse_counters(response.read().decode())
