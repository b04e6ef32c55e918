"""Helpers for end-to-end tests: real AIIDA stubs (in-process servers) claimed at a real marketplace."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from aiida_stub.config import Config as AiidaConfig
from aiida_stub.server import AiidaApp, create_server
from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie.marketplace.v1 import data_request_pb2, instance_pb2
from eddie_client.client import Session, data_need, duration
from tests.support.marketplace import RunningMarketplace


@dataclass
class RunningAiida:
    app: AiidaApp
    port: int
    instance_id: str
    pairing_code: str
    config: AiidaConfig


async def start_aiida(
    marketplace: RunningMarketplace, tmp: Path, instance_id: str, profile: Path, port: int = 0, **extra: Any
) -> RunningAiida:
    config = AiidaConfig(
        marketplace=marketplace.address,
        listen=f"127.0.0.1:{port}",
        state_dir=tmp / instance_id,
        profiles=(profile,),
        instance_id=instance_id,
        pairing_code=f"CODE-{abs(hash(instance_id)) % 10**8:08d}",
        retry_initial_delay=0.05,
        retry_max_delay=0.5,
        **extra,
    )
    app, bound = await create_server(config)
    await app.start()
    await app.wait_registered()
    assert config.pairing_code is not None
    return RunningAiida(app, bound, instance_id, config.pairing_code, config)


async def claim(owner: Session, aiida: RunningAiida) -> instance_pb2.Instance:
    return await owner.instances.ClaimInstance(
        instance_pb2.ClaimInstanceRequest(instance_id=aiida.instance_id, pairing_code=aiida.pairing_code),
        metadata=owner.metadata,
    )


async def wait_connected(
    owner: Session, instance_id: str, connected: bool = True, timeout: float = 10.0
) -> float:
    """Polls GetInstance until `connected` has the wanted value; returns the seconds it took."""
    start = time.monotonic()
    while True:
        instance = await owner.instances.GetInstance(
            instance_pb2.GetInstanceRequest(name=f"instances/{instance_id}"), metadata=owner.metadata
        )
        if instance.connected == connected:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{instance_id} connected={instance.connected} after {timeout}s")
        await asyncio.sleep(0.02)


class ScriptedAiida(aiida_pb2_grpc.AiidaServiceServicer):
    """A misbehaving device: answers pings, then per query waits `delay` (None = never answers)."""

    def __init__(self, delay: float | None, matched: bool = True) -> None:
        self.delay = delay
        self.matched = matched
        self.queries = 0

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[aiida_pb2.ConnectRequest], context: Any
    ) -> AsyncIterator[aiida_pb2.ConnectResponse]:
        async for message in request_iterator:
            if message.HasField("ping"):
                yield aiida_pb2.ConnectResponse(pong=aiida_pb2.Pong(sequence=message.ping.sequence))
            elif message.HasField("search_query"):
                self.queries += 1
                if self.delay is None:
                    continue
                await asyncio.sleep(self.delay)
                yield aiida_pb2.ConnectResponse(
                    match_reply=aiida_pb2.MatchReply(
                        query_id=message.search_query.query_id, matched=self.matched
                    )
                )


async def start_scripted(
    marketplace: RunningMarketplace, owner: Session, instance_id: str, servicer: ScriptedAiida
) -> grpc.aio.Server:
    server = grpc.aio.server()
    aiida_pb2_grpc.add_AiidaServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await marketplace.client().instances.RegisterInstance(
        instance_pb2.RegisterInstanceRequest(
            instance_id=instance_id,
            address=f"127.0.0.1:{port}",
            instance_secret="z" * 40,
            pairing_code="SCRIPTED-1",
        )
    )
    await owner.instances.ClaimInstance(
        instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code="SCRIPTED-1"),
        metadata=owner.metadata,
    )
    await wait_connected(owner, instance_id)
    return server


async def create_data_request(ep: Session, **need: object) -> data_request_pb2.DataRequest:
    """A data request of `ep` for the need `need` (data_need's plain values) on top of a broad default."""
    values = dict(
        energy_type="ELECTRICITY",
        tags=["1-0:1.8.0"],
        min_granularity=1,
        max_granularity=900,
        history=0,
        duration_s=86400.0,
        regions=[],
    )
    values.update(need)
    return await ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(
                title="Study", purpose="Research", data_need=data_need(**values)
            )
        ),  # type: ignore[arg-type]
        metadata=ep.metadata,
    )


async def search(
    ep: Session, name: str, timeout: float = 3.0
) -> tuple[list[str], data_request_pb2.SearchSummary]:
    """Runs a search of data request `name`: the matches in arrival order, and the one summary."""
    matches, summary = [], None
    async for response in ep.data_requests.SearchInstances(
        data_request_pb2.SearchInstancesRequest(data_request=name, timeout=duration(timeout)),
        metadata=ep.metadata,
    ):
        if response.HasField("matches"):
            matches.extend(response.matches.instance_ids)
        else:
            assert summary is None, "more than one summary"
            summary = response.summary
    assert summary is not None, "no summary"
    return matches, summary
