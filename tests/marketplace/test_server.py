"""Health, reflection, persistence across restarts, and the command line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from eddie.marketplace.v1 import access_pb2, identity_pb2
from eddie_common.interceptors import error_info
from marketplace_server.server import SERVICE_NAMES
from tests.support.expect import eventually
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config


async def test_health_is_serving_overall_and_per_service(marketplace: RunningMarketplace) -> None:
    stub = health_pb2_grpc.HealthStub(marketplace.channel)
    for service in ["", *SERVICE_NAMES]:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_health_goes_not_serving_on_shutdown(tmp_path: Path) -> None:
    running = await start_marketplace(test_config(tmp_path))
    stub = health_pb2_grpc.HealthStub(running.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    await running.app.lifecycle.stop(0.5)
    statuses = []
    try:
        while (reply := await watch.read()) is not grpc.aio.EOF:
            statuses.append(reply.status)
    except grpc.aio.AioRpcError:
        pass
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    await running.channel.close()
    await running.app.stop(0)


async def _stream_end(call: Any, within: float) -> grpc.aio.AioRpcError | None:
    """How a stream ended (None: OK); fails the test if it is still open after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while await call.read() is not grpc.aio.EOF:
                pass
    except TimeoutError:
        raise AssertionError(f"the stream was still open {within:g} s into the stop") from None
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def test_shutdown_ends_consent_and_watch_streams_at_once(tmp_path: Path) -> None:
    """A customer's consent stream and an EP's watch end when the stop begins, UNAVAILABLE
    (SHUTTING_DOWN: reconnect, e.g. to another replica), instead of holding the whole grace period
    open and then being cut off."""
    grace = 20.0
    running = await start_marketplace(test_config(tmp_path, grace_period=grace))
    customer, ep = await running.customer(), await running.eligible_party()
    consent = customer.consent.Connect(metadata=customer.metadata)
    while not (await consent.read()).HasField("ready"):
        pass
    watch = ep.access.WatchPermissions(access_pb2.WatchPermissionsRequest(), metadata=ep.metadata)

    async def both_open() -> bool:
        return running.app.events.open_streams() == 2

    await eventually(both_open, 10, "the consent and the watch stream are open")
    began = time.monotonic()
    stopping = asyncio.create_task(running.app.lifecycle.stop(grace))
    try:
        for name, call in (("consent", consent), ("watch", watch)):
            ended = await _stream_end(call, grace / 2)
            assert ended is not None, f"the {name} stream ended without a status to reconnect on"
            assert ended.code() == grpc.StatusCode.UNAVAILABLE, (name, ended)
            info = error_info(ended)
            assert info is not None and info.reason == "SHUTTING_DOWN", (name, info)
        await asyncio.wait_for(stopping, grace)
        print(f"streams ended and server stopped {time.monotonic() - began:.2f} s after the stop began")
    finally:
        stopping.cancel()
        await running.channel.close()
        await running.app.stop(0)


async def test_reflection_lists_every_service(marketplace: RunningMarketplace) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(marketplace.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for response in responses:
        names.update(s.name for s in response.list_services_response.service)
    assert set(SERVICE_NAMES) <= names
    assert "grpc.health.v1.Health" in names


async def test_data_survives_a_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    config = test_config(tmp_path)
    first = await start_marketplace(config)
    client = await first.customer()
    await first.channel.close()
    await first.app.stop(0)
    second = await start_marketplace(config)
    try:
        # Same key and same account: the old token still works, the refresh token still rotates.
        me = await second.client().identity.GetCurrentAccount(
            identity_pb2.GetCurrentAccountRequest(), metadata=client.metadata
        )
        assert me.name == client.account.name
        token = await second.client().identity.RefreshToken(
            identity_pb2.RefreshTokenRequest(refresh_token=client.refresh_token)
        )
        assert token.account.name == client.account.name
    finally:
        await second.channel.close()
        await second.app.stop(0)


def test_help_documents_every_flag_with_its_environment_variable() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "marketplace_server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag, env in [
        ("--listen", "MARKETPLACE_LISTEN"),
        ("--data-dir", "MARKETPLACE_DATA_DIR"),
        ("--database-url", "MARKETPLACE_DATABASE_URL"),
        ("--access-token-ttl", "MARKETPLACE_ACCESS_TOKEN_TTL"),
        ("--log-level", "MARKETPLACE_LOG_LEVEL"),
    ]:
        assert flag in out and env in out
