"""Issue 15.7: the sink under churn, as a slow test (the same soak as `make bench BENCH_ARGS=--sink-churn`).

1,000 publish streams reconnecting every 2-5 s against a sink process while EP
clients list readings without pause: every acknowledged reading is stored once
and no stream waits more than 1 s to be accepted. The same load first runs
against a bare grpc.aio server (the floor); when even that keeps streams
waiting more than 1 s, the machine is too loaded to judge the 1 s bound, and
the test says so (skip) after checking everything else.
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
    floor = figures["floor"]
    if floor["accepted_over_1s"]:
        pytest.skip(
            f"machine too loaded to judge the 1 s bound: bare grpc.aio kept {floor['accepted_over_1s']} "
            f"streams waiting > 1 s (accept {floor['accept']}); the sink: {figures['accept']}"
        )
    assert figures["accepted_over_1s"] == 0, f"accept wait: {figures['accept']}"
