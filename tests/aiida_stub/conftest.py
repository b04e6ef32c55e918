"""Fixtures: doubles of the AIIDA stub's peers (a marketplace, an EP sink) and a running stub."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.stub import (
    FakeMarketplace,
    RunningSink,
    RunningStub,
    start_marketplace,
    start_sink,
    start_stub,
    stub_config,
)


@pytest.fixture
async def marketplace() -> AsyncIterator[FakeMarketplace]:
    running = await start_marketplace()
    yield running
    await running.server.stop(0)


@pytest.fixture
async def sink() -> AsyncIterator[RunningSink]:
    running = await start_sink()
    yield running
    await running.server.stop(0)


@pytest.fixture
async def stub(tmp_path: Path, marketplace: FakeMarketplace) -> AsyncIterator[RunningStub]:
    running = await start_stub(stub_config(tmp_path, marketplace, time_scale=3600.0), marketplace)
    yield running
    await running.close()
