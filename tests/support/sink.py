"""A sink on port 0 and a marketplace double that serves only ListSigningKeys."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import identity_pb2, identity_pb2_grpc
from eddie_common import tokens
from eddie_sink.config import SinkConfig
from eddie_sink.server import SinkApp, create_server

ISSUER = "test-marketplace"
EP = "accounts/ep-1"
OTHER_EP = "accounts/ep-2"
PERMISSION = "perm-1"


class SigningKeysDouble(identity_pb2_grpc.IdentityServiceServicer):
    """The marketplace's IdentityService, reduced to ListSigningKeys."""

    def __init__(self, keys: list[tokens.SigningKey]) -> None:
        self.keys = keys
        self.calls = 0

    async def ListSigningKeys(self, request: Any, context: Any) -> identity_pb2.ListSigningKeysResponse:
        self.calls += 1
        return identity_pb2.ListSigningKeysResponse(
            signing_keys=[
                identity_pb2.SigningKey(key_id=k.key_id, algorithm="ES256", public_key_pem=k.public_pem)
                for k in self.keys
            ],
            issuer=ISSUER,
        )


@dataclass
class FakeMarketplace:
    server: grpc.aio.Server
    port: int
    identity: SigningKeysDouble
    issuer: tokens.TokenIssuer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sink_token(
        self, permission_id: str = PERMISSION, eligible_party: str = EP, ttl: float = 300, **claims: Any
    ) -> str:
        token, _ = self.issuer.issue(
            f"permissions/{permission_id}",
            tokens.AUDIENCE_SINK,
            ttl,
            permission_id=permission_id,
            eligible_party=eligible_party,
            instance_id="aiida-1",
            **claims,
        )
        return token

    def access_token(self, account: str = EP, role: str = "ROLE_ELIGIBLE_PARTY") -> str:
        token, _ = self.issuer.issue(account, tokens.AUDIENCE_MARKETPLACE, 300, role=role)
        return token


async def start_fake_marketplace(port: int = 0, key: tokens.SigningKey | None = None) -> FakeMarketplace:
    key = key or tokens.SigningKey.generate()
    identity = SigningKeysDouble([key])
    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(identity, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return FakeMarketplace(server, bound, identity, tokens.TokenIssuer(key, issuer=ISSUER))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningSink:
    app: SinkApp
    config: SinkConfig
    channel: grpc.aio.Channel
    stub: Any = field(init=False)

    def __post_init__(self) -> None:
        self.stub = data_sink_pb2_grpc.DataSinkServiceStub(self.channel)

    async def publish(self, token: str | None, readings: Iterable[energy_pb2.Reading]) -> int:
        requests = [data_sink_pb2.PublishRequest(reading=r) for r in readings]
        response = await self.stub.Publish(iter(requests), metadata=bearer(token), timeout=10)
        return int(response.accepted)

    async def list_all(self, token: str, permission_id: str = PERMISSION, page_size: int = 0) -> list[Any]:
        readings: list[Any] = []
        page_token = ""
        while True:
            response = await self.list_page(token, permission_id, page_size, page_token)
            readings.extend(response.readings)
            page_token = response.next_page_token
            if not page_token:
                return readings

    async def list_page(
        self, token: str | None, permission_id: str = PERMISSION, page_size: int = 0, page_token: str = ""
    ) -> Any:
        request = data_sink_pb2.ListReadingsRequest(
            permission_id=permission_id, page_size=page_size, page_token=page_token
        )
        return await self.stub.ListReadings(request, metadata=bearer(token), timeout=10)

    async def close(self) -> None:
        await self.channel.close()
        await self.app.stop(0.5)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


def reading(
    seconds: int,
    data_tag: str = "1-0:1.8.0",
    value: float = 1.5,
    unit: str = "kWh",
    permission_id: str = PERMISSION,
) -> energy_pb2.Reading:
    return energy_pb2.Reading(
        permission_id=permission_id,
        data_tag=data_tag,
        value=value,
        unit=unit,
        time=timestamp_pb2.Timestamp(seconds=1_700_000_000 + seconds),
    )


def sink_config(tmp_path: Path, marketplace: str, **overrides: Any) -> SinkConfig:
    base = SinkConfig(
        marketplace=marketplace,
        data_dir=tmp_path / "sink",
        listen="127.0.0.1:0",
        jsonl=tmp_path / "readings.jsonl",
        grace_period=0.5,
    )
    return replace(base, **overrides)


async def start_sink(config: SinkConfig, wait_for_keys: bool = True) -> RunningSink:
    app, port = await create_server(config)
    if wait_for_keys:
        assert await app.keys.wait_ready(10), "the sink never got the marketplace's keys"
    return RunningSink(app, config, grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
