"""The fault tests' arena: a marketplace, honest instances, an owner and an EP with an open data request."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import access_pb2, data_request_pb2, identity_pb2, instance_pb2, instance_pb2_grpc
from eddie_client.client import Session, data_need, duration
from marketplace_server.config import Config
from marketplace_server.server import Marketplace
from tests.support.hostile_aiida import HostileAiida
from tests.support.marketplace import signup, test_config

DataAccess = aiida_pb2.DataAccess
Permission = access_pb2.Permission
SINK_URI = "grpc://127.0.0.1:50099"
STATUS_FLOOD = 6000
PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"
SECRET = "fault-secret-" + "f" * 32
# Four honest instances on one port: two match the need, two do not.
HONEST = {"honest-match-1": True, "honest-match-2": True, "honest-miss-1": False, "honest-miss-2": False}
EXPECTED = {i for i, matched in HONEST.items() if matched}
NEED = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400, ["AT"])  # vienna-p1 matches it


def health_of(channel: grpc.aio.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel)  # typed for the synchronous API only


# --- the arena: a real marketplace, honest instances, an owner and an EP with an open data request ---


@dataclass
class Arena:
    channel: grpc.aio.Channel
    address: str
    app: Marketplace | None  # None: the marketplace is another process
    honest: HostileAiida
    owner: Session
    ep: Session
    data_request: data_request_pb2.DataRequest

    def linked(self, instance_id: str) -> bool:
        """The marketplace's own view (in-process only): is the instance's stream up?"""
        assert self.app is not None
        return bool(self.app.components["manager"].is_connected(instance_id))

    async def until_linked(self, instance_id: str, linked: bool = True, timeout: float = 10.0) -> None:
        if self.app is not None:
            await self.honest.until(
                lambda: self.linked(instance_id) == linked, timeout, f"{instance_id} linked"
            )
            return
        deadline = time.monotonic() + timeout
        while (
            await self.owner.instances.GetInstance(
                instance_pb2.GetInstanceRequest(name=f"instances/{instance_id}"), metadata=self.owner.metadata
            )
        ).connected != linked:
            assert time.monotonic() < deadline, f"{instance_id} never became connected={linked}"
            await asyncio.sleep(0.02)

    async def add(self, aiida: HostileAiida, instance_id: str, wait: bool = True) -> None:
        """Registers `instance_id` at `aiida`'s address and claims it for the owner."""
        code = f"CODE-{instance_id}"
        await instance_pb2_grpc.InstanceServiceStub(self.channel).RegisterInstance(
            instance_pb2.RegisterInstanceRequest(
                instance_id=instance_id, address=aiida.address, instance_secret=SECRET, pairing_code=code
            )
        )
        await self.owner.instances.ClaimInstance(
            instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code),
            metadata=self.owner.metadata,
        )
        if wait:
            await self.until_linked(instance_id)

    async def search(self, timeout: float) -> tuple[list[str], data_request_pb2.SearchSummary, float]:
        """One search; the matches in arrival order, the summary, and the seconds it took."""
        started = time.monotonic()
        matches: list[str] = []
        summary = None
        async for response in self.ep.data_requests.SearchInstances(
            data_request_pb2.SearchInstancesRequest(
                data_request=self.data_request.name, timeout=duration(timeout)
            ),
            metadata=self.ep.metadata,
            timeout=timeout + 10,
        ):
            if response.HasField("matches"):
                matches.extend(response.matches.instance_ids)
            else:
                assert summary is None, "a second summary"
                summary = response.summary
        assert summary is not None, "no summary"
        return matches, summary, time.monotonic() - started

    def assert_honest_untouched(self) -> None:
        """No honest instance's stream was ever dropped or reopened, and all are linked."""
        for instance_id in HONEST:
            assert self.honest.opened[instance_id] == 1, f"{instance_id} was reconnected"
            assert self.honest.closed[instance_id] == 0, f"{instance_id}'s stream was closed"
            assert self.app is None or self.linked(instance_id), f"{instance_id} is not linked"


def assert_exact(
    matches: list[str],
    summary: data_request_pb2.SearchSummary,
    *,
    hostile: int,
    matched: set[str] = EXPECTED,
    not_matched: int = len(HONEST) - len(EXPECTED),
    unreachable: int = 0,
    timed_out: int = 0,
) -> None:
    """The honest instances' answers are exactly right, and the hostile ones are counted as given."""
    assert len(matches) == len(set(matches)), f"duplicate matches: {matches}"
    assert set(matches) == matched
    counts = (summary.queried, summary.matched, summary.not_matched, summary.unreachable, summary.timed_out)
    expected = (len(HONEST) + hostile, len(matched), not_matched, unreachable, timed_out)
    assert counts == expected, (
        f"(queried, matched, not_matched, unreachable, timed_out) {counts} != {expected}"
    )


def arena_config(tmp_path: Path, **overrides: Any) -> Config:
    limits: dict[str, Any] = {
        "search_rate_per_minute": 1e6,
        "claim_attempts_per_minute": 1e6,
        "login_attempts_per_minute": 1e6,
        "reconnect_max_backoff": 0.5,
    }
    return test_config(tmp_path, **{**limits, **overrides})


async def build_arena(
    channel: grpc.aio.Channel, address: str, app: Marketplace | None, honest: HostileAiida
) -> Arena:
    """An owner of the honest instances (claimed and linked) and an EP with an open data request."""
    owner, ep = await asyncio.gather(
        signup(channel, identity_pb2.ROLE_CUSTOMER, "Fault"),
        signup(channel, identity_pb2.ROLE_ELIGIBLE_PARTY, "Fault"),
    )
    data_request = await ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(title="Faults", purpose="Robustness", data_need=NEED)
        ),
        metadata=ep.metadata,
    )
    arena = Arena(channel, address, app, honest, owner, ep, data_request)
    for instance_id in HONEST:
        await arena.add(honest, instance_id)
    return arena
