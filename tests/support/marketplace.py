"""A real marketplace on port 0, and signed-up callers on its channel (eddie_client Sessions)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from eddie.marketplace.v1 import identity_pb2
from eddie_client.client import Session, sign_up
from marketplace_server.config import Config
from marketplace_server.server import Marketplace, create_server

PASSWORD = "correct horse battery staple"
_counter = itertools.count()


def test_config(tmp_path: Path, **overrides: Any) -> Config:
    defaults = Config(listen="127.0.0.1:0", data_dir=tmp_path / "marketplace", grace_period=1.0)
    return replace(defaults, **overrides)


test_config.__test__ = False  # type: ignore[attr-defined]  # a factory, not a test


@dataclass
class RunningMarketplace:
    app: Marketplace
    port: int
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, token: str = "") -> Session:
        """A caller with `token` ("" calls anonymously)."""
        return Session(self.channel, token)

    async def signup(self, role: int, name: str = "") -> Session:
        return await signup(self.channel, role, name)

    async def customer(self, name: str = "") -> Session:
        return await self.signup(identity_pb2.ROLE_CUSTOMER, name)

    async def eligible_party(self, name: str = "") -> Session:
        return await self.signup(identity_pb2.ROLE_ELIGIBLE_PARTY, name)

    async def close(self, grace: float = 0.5) -> None:
        await self.channel.close()
        await self.app.stop(grace)


async def signup(channel: grpc.aio.Channel, role: int, name: str = "") -> Session:
    """A new account of `role` (password PASSWORD, a unique e-mail), signed in."""
    n = next(_counter)
    return await sign_up(channel, role, f"user{n}-{os.getpid()}@example.org", PASSWORD, name or f"User {n}")


async def start_marketplace(config: Config) -> RunningMarketplace:
    app, port = await create_server(config)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return RunningMarketplace(app, port, channel)
