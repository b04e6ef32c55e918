"""Issue 15.7: the sink under churn, as a slow test (the same soak as `make bench BENCH_ARGS=--sink-churn`).

1,000 publish streams reconnecting every 2-5 s against a sink process while EP
clients list readings without pause: every acknowledged reading is stored once
and no stream waits more than 1 s to be accepted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import sink_churn

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_a_thousand_reconnecting_streams_are_each_accepted_within_a_second(tmp_path: Path) -> None:
    figures = sink_churn.run(tmp_path, streams=1000, seconds=30.0, listers=8)
    sink_churn.print_figures(figures)
    assert figures["errors"] == {}, "readings lost, duplicated or refused"
    assert figures["failed_sessions"] == 0
    assert figures["readings_acked"] > 0 and figures["list_readings"]["calls"] > 0
    assert figures["accepted_over_1s"] == 0, f"accept wait: {figures['accept']}"
