"""Setting the scene for workflow 6: claimed instances on an AIIDA double, a data request, a search."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, instance_pb2
from eddie_client.client import Session
from tests.support.aiida_double import AiidaDouble, RunningAiida, start_aiida
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config

Permission = access_pb2.Permission
SINK_URI = "grpc://127.0.0.1:50099"
SECRET = "instance-secret-" + "x" * 32
DAY = 86_400
_ids = itertools.count()


def market_config(tmp_path: Path, **overrides: Any) -> Any:
    defaults: dict[str, Any] = {"claim_attempts_per_minute": 10_000, "reconnect_max_backoff": 0.5}
    return test_config(tmp_path, **{**defaults, **overrides})


@pytest.fixture
async def market(tmp_path: Path) -> AsyncIterator[RunningMarketplace]:
    running = await start_marketplace(market_config(tmp_path))
    yield running
    await running.channel.close()
    await running.app.stop(0.2)


@pytest.fixture
async def aiida() -> AsyncIterator[RunningAiida]:
    running = await start_aiida(AiidaDouble())
    yield running
    await running.stop()


def data_need(duration_seconds: int = 30 * DAY) -> energy_pb2.DataNeed:
    return energy_pb2.DataNeed(
        energy_type=energy_pb2.ENERGY_TYPE_ELECTRICITY,
        data_tags=["1-0:1.8.0"],
        min_granularity=Duration(seconds=60),
        max_granularity=Duration(seconds=900),
        duration=Duration(seconds=duration_seconds),
        regions=["AT"],
    )


@dataclass
class Scene:
    """An EP with an open data request, and customers each owning one instance on the double."""

    market: RunningMarketplace
    aiida: RunningAiida
    ep: Session
    data_request: data_request_pb2.DataRequest
    customers: dict[str, Session] = field(default_factory=dict)  # instance id -> owner

    @property
    def double(self) -> AiidaDouble:
        return self.aiida.double

    async def add_instance(self, customer: Session | None = None, matched: bool = True) -> str:
        instance_id = f"aiida-{next(_ids)}"
        code = f"CODE-{instance_id}"
        self.double.matches[instance_id] = matched
        await self.market.client().instances.RegisterInstance(
            instance_pb2.RegisterInstanceRequest(
                instance_id=instance_id, address=self.aiida.address, instance_secret=SECRET, pairing_code=code
            )
        )
        owner = customer or await self.market.customer()
        await owner.instances.ClaimInstance(
            instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code),
            metadata=owner.metadata,
        )
        self.customers[instance_id] = owner
        await self.double.until(lambda: self.double.connected(instance_id))
        await self.until_linked(instance_id)
        return instance_id

    async def until_linked(self, instance_id: str, linked: bool = True, timeout: float = 10.0) -> None:
        """Waits until the marketplace sees the instance's stream up (or down)."""
        manager = self.market.app.manager
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while manager.is_connected(instance_id) != linked:
            assert loop.time() < end, f"{instance_id} never became linked={linked}"
            await asyncio.sleep(0.01)

    async def search(self, data_request: data_request_pb2.DataRequest | None = None) -> list[str]:
        request = data_request_pb2.SearchInstancesRequest(
            data_request=(data_request or self.data_request).name, timeout=Duration(seconds=5)
        )
        matched = []
        async for response in self.ep.data_requests.SearchInstances(request, metadata=self.ep.metadata):
            if response.HasField("matches"):
                matched.extend(response.matches.instance_ids)
        return matched

    async def request_access(
        self, *instance_ids: str, request_id: str = "", ep: Session | None = None
    ) -> list[Any]:
        caller = ep or self.ep
        response = await caller.access.RequestAccess(
            access_pb2.RequestAccessRequest(
                data_request=self.data_request.name,
                instance_ids=list(instance_ids),
                sink_uri=SINK_URI,
                request_id=request_id,
            ),
            metadata=caller.metadata,
        )
        return list(response.permissions)

    async def sibling(self) -> Scene:
        """The same EP and customers under a second data request, searched: an instance with a live
        permission here can get a second one there (one data request gives one live permission)."""
        data_request = await self.ep.data_requests.CreateDataRequest(
            data_request_pb2.CreateDataRequestRequest(
                data_request=data_request_pb2.DataRequest(
                    title=f"{self.data_request.title} (2)",
                    purpose=self.data_request.purpose,
                    data_need=self.data_request.data_need,
                )
            ),
            metadata=self.ep.metadata,
        )
        other = Scene(self.market, self.aiida, self.ep, data_request, self.customers)
        await other.search()
        return other

    async def decide(self, permission: Any, approve: bool, reason: str = "") -> Any:
        customer = self.customers[permission.instance_id]
        return await customer.consent.DecideAccess(
            consent_pb2.DecideAccessRequest(permission=permission.name, approve=approve, reason=reason),
            metadata=customer.metadata,
        )

    async def get(self, permission: Any, client: Session | None = None) -> Any:
        caller = client or self.ep
        return await caller.access.GetPermission(
            access_pb2.GetPermissionRequest(name=permission.name), metadata=caller.metadata
        )

    async def until_state(self, permission: Any, state: int, timeout: float = 10.0) -> Any:
        """Follows WatchPermissions until the permission is in `state`; returns it."""
        call = self.ep.access.WatchPermissions(
            access_pb2.WatchPermissionsRequest(data_request=permission.data_request),
            metadata=self.ep.metadata,
        )
        try:
            async with asyncio.timeout(timeout):
                async for event in call:
                    if event.permission.name == permission.name and event.permission.state == state:
                        return event.permission
        finally:
            call.cancel()
        raise AssertionError("the watch ended")


async def new_scene(
    market: RunningMarketplace, aiida: RunningAiida, duration_seconds: int = 30 * DAY
) -> Scene:
    ep = await market.eligible_party("Wien Energie")
    data_request = await ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(
                title="Heat pump study",
                purpose="Grid planning research",
                data_need=data_need(duration_seconds),
            )
        ),
        metadata=ep.metadata,
    )
    return Scene(market, aiida, ep, data_request)


async def matched_scene(
    market: RunningMarketplace, aiida: RunningAiida, instances: int = 1, unmatched: int = 0
) -> tuple[Scene, list[str]]:
    """A scene with `instances` matched (and `unmatched` unmatched) instances, searched once."""
    scene = await new_scene(market, aiida)
    ids = [await scene.add_instance() for _ in range(instances)]
    others = [await scene.add_instance(matched=False) for _ in range(unmatched)]
    assert sorted(await scene.search()) == sorted(ids)
    return scene, ids + others


async def read_until(call: Any, predicate: Any, timeout: float = 10.0) -> list[Any]:
    """Reads stream messages until one satisfies `predicate`; returns all read."""
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF, "the stream ended"
            seen.append(message)
            if predicate(message):
                return seen
