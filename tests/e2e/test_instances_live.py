"""Workflow 2 with real AIIDA stubs: claim → connected, kill → disconnected, restarts reconnect."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc

from aiida_stub.server import create_server
from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie.marketplace.v1 import instance_pb2
from eddie_common.tokens import AUDIENCE_AIIDA, SigningKey, TokenIssuer
from tests.support.expect import expect_error
from tests.support.fleet import claim, start_aiida, wait_connected
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config

PROFILE = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles" / "vienna-p1.toml"


async def test_claimed_instance_connects_within_a_second(
    marketplace: RunningMarketplace, tmp_path: Path
) -> None:
    aiida = await start_aiida(marketplace, tmp_path, "aiida-home-1", PROFILE)
    owner = await marketplace.customer()
    instance = await claim(owner, aiida)
    assert instance.state == instance_pb2.Instance.STATE_CLAIMED
    assert await wait_connected(owner, "aiida-home-1", timeout=1.0) <= 1.0
    await aiida.app.stop(0)


async def test_kill_and_restart_of_the_aiida_reconnects(
    marketplace: RunningMarketplace, tmp_path: Path
) -> None:
    aiida = await start_aiida(marketplace, tmp_path, "aiida-home-2", PROFILE)
    owner = await marketplace.customer()
    await claim(owner, aiida)
    await wait_connected(owner, "aiida-home-2")
    await aiida.app.stop(0)
    await wait_connected(owner, "aiida-home-2", connected=False, timeout=5)
    # Same state dir, same instance id and secret; a new port: re-registration moves the stream.
    app, _ = await create_server(replace(aiida.config, listen="127.0.0.1:0"))
    await app.start()
    await app.wait_registered()
    await wait_connected(owner, "aiida-home-2", timeout=5)
    await app.stop(0)


async def test_marketplace_restart_reconnects_every_claimed_instance(tmp_path: Path) -> None:
    config = test_config(tmp_path)
    first = await start_marketplace(config)
    owner = await first.customer()
    aiidas = [await start_aiida(first, tmp_path, f"aiida-r{i}", PROFILE) for i in range(3)]
    for aiida in aiidas:
        await claim(owner, aiida)
        await wait_connected(owner, aiida.instance_id)
    await first.channel.close()
    await first.app.stop(0)
    second = await start_marketplace(config)
    try:
        again = second.client(owner.token)
        for aiida in aiidas:
            await wait_connected(again, aiida.instance_id, timeout=10)
    finally:
        for aiida in aiidas:
            await aiida.app.stop(0)
        await second.channel.close()
        await second.app.stop(0)


async def test_aiida_refuses_calls_signed_by_another_marketplace(
    marketplace: RunningMarketplace, tmp_path: Path
) -> None:
    aiida = await start_aiida(marketplace, tmp_path, "aiida-home-3", PROFILE)
    rogue = TokenIssuer(SigningKey.generate(), marketplace.app.config.issuer)
    genuine = marketplace.app.issuer
    async with grpc.aio.insecure_channel(f"127.0.0.1:{aiida.port}") as channel:
        stub = aiida_pb2_grpc.AiidaServiceStub(channel)

        def md(token: str, instance: str = "aiida-home-3") -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {token}"), ("aiida-instance-id", instance))

        ok = await stub.ListDataAccesses(
            aiida_pb2.ListDataAccessesRequest(),
            metadata=md(genuine.issue("instances/aiida-home-3", AUDIENCE_AIIDA, 60)[0]),
        )
        assert list(ok.data_accesses) == []
        for token, instance in [
            (rogue.issue("instances/aiida-home-3", AUDIENCE_AIIDA, 60)[0], "aiida-home-3"),
            (genuine.issue("instances/another-box", AUDIENCE_AIIDA, 60)[0], "aiida-home-3"),
            (genuine.issue("instances/aiida-home-3", "marketplace", 60)[0], "aiida-home-3"),
            (genuine.issue("instances/aiida-home-3", AUDIENCE_AIIDA, 60)[0], "another-box"),
        ]:
            await expect_error(
                stub.ListDataAccesses(aiida_pb2.ListDataAccessesRequest(), metadata=md(token, instance)),
                grpc.StatusCode.UNAUTHENTICATED,
            )
        await expect_error(
            stub.ListDataAccesses(aiida_pb2.ListDataAccessesRequest()), grpc.StatusCode.UNAUTHENTICATED
        )
    await aiida.app.stop(0)
