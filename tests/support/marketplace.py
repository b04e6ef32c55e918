"""A real marketplace on port 0, and clients through generated stubs."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from eddie.marketplace.v1 import (
    access_pb2_grpc,
    consent_pb2_grpc,
    data_request_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    instance_pb2_grpc,
)
from marketplace_server.config import Config
from marketplace_server.server import Marketplace, create_server

_counter = itertools.count()


def test_config(tmp_path: Path, **overrides: Any) -> Config:
    defaults = Config(listen="127.0.0.1:0", data_dir=tmp_path / "marketplace", grace_period=1.0)
    return replace(defaults, **overrides)


test_config.__test__ = False  # type: ignore[attr-defined]  # a factory, not a test


@dataclass
class Client:
    """Stubs on one channel plus the caller's bearer metadata."""

    channel: grpc.aio.Channel
    token: str = ""
    account: identity_pb2.Account | None = None
    refresh_token: str = ""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    @property
    def identity(self) -> identity_pb2_grpc.IdentityServiceStub:
        return identity_pb2_grpc.IdentityServiceStub(self.channel)

    @property
    def instances(self) -> instance_pb2_grpc.InstanceServiceStub:
        return instance_pb2_grpc.InstanceServiceStub(self.channel)

    @property
    def data_requests(self) -> data_request_pb2_grpc.DataRequestServiceStub:
        return data_request_pb2_grpc.DataRequestServiceStub(self.channel)

    @property
    def access(self) -> access_pb2_grpc.AccessServiceStub:
        return access_pb2_grpc.AccessServiceStub(self.channel)

    @property
    def consent(self) -> consent_pb2_grpc.ConsentServiceStub:
        return consent_pb2_grpc.ConsentServiceStub(self.channel)


@dataclass
class RunningMarketplace:
    app: Marketplace
    port: int
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, token: str = "") -> Client:
        return Client(self.channel, token)

    async def signup(self, role: int, name: str = "") -> Client:
        n = next(_counter)
        email = f"user{n}-{os.getpid()}@example.org"
        password = "correct horse battery staple"
        stub = identity_pb2_grpc.IdentityServiceStub(self.channel)
        account = await stub.CreateAccount(
            identity_pb2.CreateAccountRequest(
                email=email, password=password, display_name=name or f"User {n}", role=role
            )
        )
        token = await stub.CreateToken(identity_pb2.CreateTokenRequest(email=email, password=password))
        return Client(self.channel, token.access_token, account, token.refresh_token)

    async def customer(self, name: str = "") -> Client:
        return await self.signup(identity_pb2.ROLE_CUSTOMER, name)

    async def eligible_party(self, name: str = "") -> Client:
        return await self.signup(identity_pb2.ROLE_ELIGIBLE_PARTY, name)

    async def close(self, grace: float = 0.5) -> None:
        await self.channel.close()
        await self.app.stop(grace)


async def start_marketplace(config: Config) -> RunningMarketplace:
    app, port = await create_server(config)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return RunningMarketplace(app, port, channel)
