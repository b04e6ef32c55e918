"""Fixtures: the arena (tests.support.arena) on an in-process marketplace."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.arena import HONEST, Arena, arena_config, build_arena
from tests.support.hostile_aiida import HostileAiida, Script
from tests.support.marketplace import start_marketplace


@pytest.fixture
async def arena(tmp_path: Path) -> AsyncIterator[Arena]:
    honest = await HostileAiida({i: Script(matched) for i, matched in HONEST.items()}).start()
    market = await start_marketplace(arena_config(tmp_path))
    try:
        yield await build_arena(market.channel, market.address, market.app, honest)
    finally:
        await market.channel.close()
        await market.app.stop(0.2)
        await honest.stop()
