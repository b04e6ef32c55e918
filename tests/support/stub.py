"""Test doubles for the AIIDA stub's peers (a marketplace's InstanceService, an EP sink) and a running stub.

The doubles are real grpc.aio servers on port 0 implementing the generated
servicers; the stub under test talks to them exactly as in production.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from aiida_stub.config import Config
from aiida_stub.server import AiidaApp, create_server
from eddie.aiida.v1 import aiida_pb2_grpc
from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import instance_pb2, instance_pb2_grpc
from eddie_common import tokens

ISSUER = "test-marketplace"


class FakeInstanceService(instance_pb2_grpc.InstanceServiceServicer):
    """RegisterInstance as the marketplace does it: pins the secret, returns its public key and issuer."""

    def __init__(self, key: tokens.SigningKey) -> None:
        self.key = key
        self.secrets: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self.pairing_codes: dict[str, str] = {}
        self.calls = 0
        self.fail_next = 0  # answer UNAVAILABLE this many times first

    async def RegisterInstance(self, request: Any, context: Any) -> instance_pb2.RegisterInstanceResponse:
        self.calls += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
        pinned = self.secrets.setdefault(request.instance_id, request.instance_secret)
        if pinned != request.instance_secret:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "instance secret mismatch")
        self.addresses[request.instance_id] = request.address
        self.pairing_codes[request.instance_id] = request.pairing_code
        return instance_pb2.RegisterInstanceResponse(
            instance=instance_pb2.Instance(
                name=f"instances/{request.instance_id}", instance_id=request.instance_id
            ),
            marketplace_public_key=self.key.public_pem,
            marketplace_issuer=ISSUER,
        )


@dataclass
class FakeMarketplace:
    server: grpc.aio.Server
    port: int
    service: FakeInstanceService
    issuer: tokens.TokenIssuer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token(self, instance_id: str, audience: str = tokens.AUDIENCE_AIIDA, ttl: float = 300.0) -> str:
        return self.issuer.issue(f"instances/{instance_id}", audience, ttl)[0]

    def metadata(self, instance_id: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(instance_id)}"), ("aiida-instance-id", instance_id))


async def start_marketplace() -> FakeMarketplace:
    key = tokens.SigningKey.generate()
    service = FakeInstanceService(key)
    server = grpc.aio.server()
    instance_pb2_grpc.add_InstanceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return FakeMarketplace(server, port, service, tokens.TokenIssuer(key, ISSUER))


class FakeSink(data_sink_pb2_grpc.DataSinkServiceServicer):
    """Collects published readings per permission; checks the bearer token against the expected one."""

    def __init__(self) -> None:
        self.readings: dict[str, list[energy_pb2.Reading]] = defaultdict(list)
        self.tokens: dict[str, str] = {}  # permission id -> expected sink token
        self.streams = 0
        self.reject_with: grpc.StatusCode | None = None
        self.arrived = asyncio.Event()

    async def Publish(self, request_iterator: Any, context: Any) -> data_sink_pb2.PublishResponse:
        self.streams += 1
        if self.reject_with is not None:
            await context.abort(self.reject_with, "rejected by the test sink")
        token = dict(context.invocation_metadata()).get("authorization", "")
        accepted = 0
        async for request in request_iterator:
            reading = request.reading
            if token != f"Bearer {self.tokens.get(reading.permission_id)}":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong token")
            self.readings[reading.permission_id].append(reading)
            self.arrived.set()
            accepted += 1
        return data_sink_pb2.PublishResponse(accepted=accepted)

    def unique(self, permission_id: str) -> dict[tuple[str, int], float]:
        """(tag, time in µs) -> value, duplicates collapsed (delivery is at-least-once)."""
        return {(r.data_tag, r.time.ToMicroseconds()): r.value for r in self.readings[permission_id]}


@dataclass
class RunningSink:
    server: grpc.aio.Server
    port: int
    service: FakeSink

    @property
    def uri(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"


async def start_sink(port: int = 0) -> RunningSink:
    service = FakeSink()
    server = grpc.aio.server()
    data_sink_pb2_grpc.add_DataSinkServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return RunningSink(server, bound, service)


def stub_config(tmp_path: Path, marketplace: FakeMarketplace, **overrides: Any) -> Config:
    base = Config(
        marketplace=marketplace.address,
        state_dir=tmp_path / "state",
        instance_id="aiida-test-1",
        retry_initial_delay=0.05,
        retry_max_delay=0.2,
    )
    return replace(base, **overrides)


@dataclass
class RunningStub:
    app: AiidaApp
    port: int
    channel: grpc.aio.Channel
    marketplace: FakeMarketplace

    @property
    def aiida(self) -> aiida_pb2_grpc.AiidaServiceAsyncStub:
        return aiida_pb2_grpc.AiidaServiceStub(self.channel)

    def metadata(self, instance_id: str = "aiida-test-1") -> tuple[tuple[str, str], ...]:
        return self.marketplace.metadata(instance_id)

    async def close(self) -> None:
        await self.channel.close()
        await self.app.stop(0)


async def start_stub(config: Config, marketplace: FakeMarketplace, *, registered: bool = True) -> RunningStub:
    app, port = await create_server(config)
    await app.start()
    if registered:
        await asyncio.wait_for(app.wait_registered(), 10)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return RunningStub(app, port, channel, marketplace)
