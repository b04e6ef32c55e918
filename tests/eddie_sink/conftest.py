"""Fixtures: a sink on port 0 and a marketplace double that serves only ListSigningKeys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.sink import FakeMarketplace, RunningSink, sink_config, start_fake_marketplace, start_sink


@pytest.fixture
async def fake_marketplace() -> AsyncIterator[FakeMarketplace]:
    running = await start_fake_marketplace()
    yield running
    await running.server.stop(0)


@pytest.fixture
async def sink(tmp_path: Path, fake_marketplace: FakeMarketplace) -> AsyncIterator[RunningSink]:
    running = await start_sink(sink_config(tmp_path, fake_marketplace.address))
    yield running
    await running.close()
