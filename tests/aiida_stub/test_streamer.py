"""The streamer's backlog stays bounded when the simulated clock runs far ahead of the sink."""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiida_stub.accesses import stream_plan
from aiida_stub.meter import Meter
from aiida_stub.profile import load_profile, shipped_profiles_dir
from aiida_stub.state import AccessRecord
from aiida_stub.streamer import BACKLOG_LIMIT, AccessStreamer, SimClock, SinkChannels
from eddie.aiida.v1 import aiida_pb2
from eddie_common.retry import Backoff
from tests.support.stub_messages import S, data_need


@dataclass(frozen=True)
class FrozenClock(SimClock):
    now_us: int = 0

    def sim_now_us(self, access: AccessRecord) -> int:
        return self.now_us


async def test_backlog_keeps_only_the_newest_readings() -> None:
    profile = load_profile(shipped_profiles_dir() / "vienna-p1.toml")
    start = (int(time.time()) - 86400) * S
    access = AccessRecord(
        "p-far",
        aiida_pb2.DataAccess.STATE_ACTIVE,
        data_need=data_need(min_s=1),
        sink_uri="grpc://127.0.0.1:1",
        sink_token="t",
        start_us=start,
        end_us=start + 2 * 86400 * S,
    )
    plan = stream_plan(profile, access, 0)
    assert (plan.tags, plan.granularity_us) == (("1-0:1.8.0", "1-0:1.7.0"), S)
    channels = SinkChannels()
    streamer = AccessStreamer(
        access,
        plan,
        Meter(profile.seed),
        channels,
        FrozenClock(1.0, start + 86400 * S),
        on_progress=lambda: None,
        on_finished=lambda state, reason: None,
        backoff=Backoff(),
    )
    await streamer._generate()  # a day of one-second intervals is due: 172,800 readings
    backlog = streamer._backlog
    assert len(backlog) == BACKLOG_LIMIT
    assert backlog[-1].time_us == start + 86400 * S
    assert backlog[0].time_us == start + 86400 * S - (BACKLOG_LIMIT // 2 - 1) * S
    await channels.close()


def test_granularity_is_the_coarser_of_native_interval_and_min_granularity() -> None:
    profile = load_profile(shipped_profiles_dir() / "germany-heatpump.toml")  # electricity at PT1M
    access = AccessRecord("p", aiida_pb2.DataAccess.STATE_ACTIVE, data_need=data_need(min_s=1))
    assert stream_plan(profile, access, 0).granularity_us == 60 * S
    access = AccessRecord("p", aiida_pb2.DataAccess.STATE_ACTIVE, data_need=data_need(min_s=900))
    assert stream_plan(profile, access, 0).granularity_us == 900 * S
    access = AccessRecord("p", aiida_pb2.DataAccess.STATE_ACTIVE, data_need=data_need(tags=()))
    assert stream_plan(profile, access, 0).tags == ("1-0:1.8.0", "1-0:2.8.0", "1-0:1.7.0", "1-0:2.7.0")


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(initial=0.2, cap=5.0)
    for attempt, base in [(1, 0.2), (2, 0.4), (3, 0.8), (6, 5.0), (100, 5.0)]:
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(base * 0.5 <= d <= base for d in delays)
