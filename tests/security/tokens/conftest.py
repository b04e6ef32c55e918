"""Fixtures: the three programs, on one event loop, for the whole tokens package."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from aiida_stub.config import Config as AiidaConfig
from aiida_stub.server import create_server as create_aiida
from eddie_sink.config import SinkConfig
from eddie_sink.server import create_server as create_sink
from tests.support.marketplace import start_marketplace, test_config
from tests.support.token_programs import FLEET_PREFIX, PERMISSION, Programs, publish


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def programs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Programs]:
    tmp = tmp_path_factory.mktemp("tokens")
    market = await start_marketplace(test_config(tmp))
    aiida_config = AiidaConfig(
        marketplace=market.address,
        state_dir=tmp / "aiida",
        fleet=2,
        id_prefix=FLEET_PREFIX,
        retry_initial_delay=0.05,
        retry_max_delay=0.5,
        grace_period=0.2,
    )
    aiida, aiida_port = await create_aiida(aiida_config)
    await aiida.start()
    await asyncio.wait_for(aiida.wait_registered(), 10)
    sink, _ = await create_sink(
        SinkConfig(marketplace=market.address, data_dir=tmp / "sink", grace_period=0.2)
    )
    assert await sink.keys.wait_ready(10), "the sink never got the marketplace's keys"
    running = Programs(
        market,
        aiida,
        aiida_port,
        grpc.aio.insecure_channel(f"127.0.0.1:{aiida_port}"),
        sink,
        grpc.aio.insecure_channel(f"127.0.0.1:{sink.port}"),
        await market.customer(),
        await market.eligible_party(),
    )
    running.sink_token = running.mint_sink_token(PERMISSION)
    # The sink learns the permission (and its eligible party) from the first reading.
    assert await publish(running, f"Bearer {running.sink_token}") == 1
    yield running
    await running.sink_channel.close()
    await running.aiida_channel.close()
    await sink.stop(0)
    await aiida.stop(0)
    await market.channel.close()
    await market.app.stop(0)
