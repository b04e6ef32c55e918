"""A populated marketplace for hostile-input tests, hosted on a background event loop.

The world holds real objects (accounts of both roles, a claimed and connected
instance on an AIIDA double, an unclaimed one, data requests, a stored search,
pending and accepted permissions, page tokens), so hostile requests can name
things that exist and reach the code behind the first validation check.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, identity_pb2, instance_pb2
from eddie_client.client import Session
from eddie_common import tokens
from tests.support.aiida_double import AiidaDouble, RunningAiida, start_aiida
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config
from tests.support.strategies import Hints

PASSWORD = "correct horse battery staple"
SECRET = "s" * 40
SINK_URI = "grpc://127.0.0.1:50099"


def world_config(tmp: Path, **overrides: Any) -> Any:
    """Limits high enough that fuzzing measures validation, not the rate limiters."""
    defaults: dict[str, Any] = {
        "login_attempts_per_minute": 1e9,
        "claim_attempts_per_minute": 1e9,
        "search_rate_per_minute": 1e9,
        "max_streams_per_account": 100_000,
        "search_timeout_max": 2.0,
        "reconnect_max_backoff": 0.5,
    }
    return test_config(tmp, **{**defaults, **overrides})


@dataclass
class World:
    market: RunningMarketplace
    aiida: RunningAiida
    customer: Session
    ep: Session
    other_customer: Session
    other_ep: Session
    pools: dict[str, list[str]] = field(default_factory=dict)
    forged_tokens: list[str] = field(default_factory=list)

    def callers(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """Who calls: both roles, strangers of both roles, nobody, and forged credentials."""
        return {
            "customer": self.customer.metadata,
            "eligible_party": self.ep.metadata,
            "other_customer": self.other_customer.metadata,
            "other_eligible_party": self.other_ep.metadata,
            "anonymous": (),
            **{f"forged{i}": (("authorization", t),) for i, t in enumerate(self.forged_tokens)},
        }

    def hints(self) -> Hints:
        """Plausible values by field name: real names from the world, valid formats otherwise."""
        pools = self.pools

        def pool(*kinds: str) -> st.SearchStrategy[str]:
            return st.sampled_from([v for k in kinds for v in pools[k]])

        new_id = st.builds(lambda: f"fz-{uuid.uuid4().hex[:12]}")
        return {
            "email": st.one_of(pool("email"), st.builds(lambda: f"fz-{uuid.uuid4().hex[:8]}@example.org")),
            "password": st.just(PASSWORD),
            "display_name": st.just("Fuzzy Tester"),
            "role": st.sampled_from([1, 2]),
            "refresh_token": pool("refresh_token"),
            "instance_id": st.one_of(pool("instance_id"), new_id),
            "instance_ids": st.lists(pool("instance_id"), min_size=1, max_size=3),
            "address": st.sampled_from(["127.0.0.1:9", "localhost:65535", "[::1]:1"]),
            "instance_secret": st.just(SECRET),
            "pairing_code": st.one_of(pool("pairing_code"), st.just("ABCDEF-123")),
            "name": pool("data_request", "permission", "search", "instance"),
            "data_request": pool("data_request"),
            "permission": pool("permission"),
            "instance": pool("instance"),
            "owner": pool("account"),
            "page_size": st.sampled_from([0, 1, 2, 500]),
            "page_token": pool("page_token"),
            "kind": st.sampled_from([0, 1, 2]),
            "energy_type": st.sampled_from([1, 2, 3, 4]),
            "state": st.sampled_from(list(access_pb2.Permission.State.values())),
            "region": st.sampled_from(["AT", "AT-9", "DE", "at-9"]),
            "regions": st.sampled_from([[], ["AT"], ["AT-9", "DE"]]),
            "text": st.sampled_from(["heat", "%", "_", "Heat pump"]),
            "title": st.just("Heat pump study"),
            "description": st.just("What heat pumps do to the load.\nSecond line."),
            "purpose": st.just("Grid planning research"),
            "policy_uri": st.just("https://example.org/privacy"),
            "data_tags": st.sampled_from([["1-0:1.8.0"], ["1-0:1.8.0", "1-0:2.8.0"]]),
            "min_granularity": st.just(Duration(seconds=60)),
            "max_granularity": st.just(Duration(seconds=900)),
            "history": st.sampled_from([Duration(), Duration(seconds=86_400)]),
            "duration": st.just(Duration(seconds=30 * 86_400)),
            "timeout": st.sampled_from([Duration(nanos=200_000_000), Duration(seconds=1)]),
            "sink_uri": st.sampled_from([SINK_URI, "grpcs://localhost:443"]),
            "request_id": st.one_of(st.just("fuzz-request-1"), st.builds(lambda: str(uuid.uuid4()))),
            "reason": st.sampled_from(["", "no longer needed", "Grund: Datenschutz ✓"]),
            "approve": st.booleans(),
            "show_closed": st.booleans(),
        }

    async def health(self) -> int:
        stub = health_pb2_grpc.HealthStub(self.market.channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(response.status)

    async def normal_calls(self) -> None:
        """A signed-in call of each role still works."""
        account = await self.customer.identity.GetCurrentAccount(
            identity_pb2.GetCurrentAccountRequest(), metadata=self.customer.metadata, timeout=5
        )
        assert account.name == self.customer.account.name  # type: ignore[union-attr]
        await self.ep.data_requests.ListDataRequests(
            data_request_pb2.ListDataRequestsRequest(page_size=5), metadata=self.ep.metadata, timeout=5
        )

    async def close(self) -> None:
        await self.market.channel.close()
        await self.market.app.stop(0.2)
        await self.aiida.stop()


def data_need() -> energy_pb2.DataNeed:
    return energy_pb2.DataNeed(
        energy_type=energy_pb2.ENERGY_TYPE_ELECTRICITY,
        data_tags=["1-0:1.8.0"],
        min_granularity=Duration(seconds=60),
        max_granularity=Duration(seconds=900),
        duration=Duration(seconds=30 * 86_400),
        regions=["AT"],
    )


async def register_and_claim(world: World, instance_id: str, owner: Session | None) -> None:
    code = f"CODE-{instance_id}"
    await world.market.client().instances.RegisterInstance(
        instance_pb2.RegisterInstanceRequest(
            instance_id=instance_id, address=world.aiida.address, instance_secret=SECRET, pairing_code=code
        )
    )
    world.pools["instance_id"].append(instance_id)
    world.pools["instance"].append(f"instances/{instance_id}")
    world.pools["pairing_code"].append(code)
    if owner is not None:
        world.aiida.double.matches[instance_id] = True
        await owner.instances.ClaimInstance(
            instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code),
            metadata=owner.metadata,
        )
        manager = world.market.app.components["manager"]
        async with asyncio.timeout(10):
            while not manager.is_connected(instance_id):
                await asyncio.sleep(0.01)


async def _data_request_with_permission(world: World, approve: bool | None) -> None:
    ep = world.ep
    dr = await ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(
                title="Heat pump study", purpose="Grid planning research", data_need=data_need()
            )
        ),
        metadata=ep.metadata,
    )
    world.pools["data_request"].append(dr.name)
    search = ""
    async for response in ep.data_requests.SearchInstances(
        data_request_pb2.SearchInstancesRequest(data_request=dr.name, timeout=Duration(seconds=2)),
        metadata=ep.metadata,
    ):
        if response.HasField("summary"):
            search = response.summary.search
    world.pools["search"].append(search)
    response = await ep.access.RequestAccess(
        access_pb2.RequestAccessRequest(
            data_request=dr.name, instance_ids=world.pools["instance_id"][:1], sink_uri=SINK_URI
        ),
        metadata=ep.metadata,
    )
    permission = response.permissions[0]
    world.pools["permission"].append(permission.name)
    if approve is not None:
        await world.customer.consent.DecideAccess(
            consent_pb2.DecideAccessRequest(permission=permission.name, approve=approve),
            metadata=world.customer.metadata,
        )


async def _page_tokens(world: World) -> list[str]:
    found = []
    for client in (world.customer, world.ep):
        listed = await client.data_requests.ListDataRequests(
            data_request_pb2.ListDataRequestsRequest(page_size=1), metadata=client.metadata
        )
        found.append(listed.next_page_token)
        permissions = await client.access.ListPermissions(
            access_pb2.ListPermissionsRequest(page_size=1), metadata=client.metadata
        )
        found.append(permissions.next_page_token)
    return [t for t in found if t] + _forged_page_tokens(found[0])


def _forged_page_tokens(real: str) -> list[str]:
    """Tampered, padded, non-canonical, oversized, and deeply nested (unsigned) cursors."""
    deep = b'{"m":"ListDataRequests","f":"x","c":{"seq":' + b"[" * 300 + b"]" * 300 + b"}}"
    return [
        real[:-1] + ("A" if real[-1:] != "A" else "B"),
        real + "==",
        real.replace("-", "+").replace("_", "/"),
        base64.urlsafe_b64encode(deep + b"0" * 16).decode().rstrip("="),
        base64.urlsafe_b64encode(b'{"m":"ListDataRequests","c":{"seq":-1e999}}' + b"0" * 16).decode(),
        "A" * 1024,
        "A" * 1025,
        "é" * 10,
    ]


def _forged_tokens(world: World) -> list[str]:
    key = tokens.SigningKey.generate()
    stranger = tokens.TokenIssuer(key, world.market.app.config.issuer)
    real = world.market.app.issuer
    customer_id = world.customer.account.name  # type: ignore[union-attr]
    return [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer not.a.jwt",
        "Bearer " + "A" * 6000,
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhY2NvdW50cy94In0.",
        "Bearer "
        + stranger.issue(customer_id, tokens.AUDIENCE_MARKETPLACE, 60, role="ROLE_CUSTOMER", typ="access")[0],
        "Bearer " + real.issue(customer_id, tokens.AUDIENCE_AIIDA, 60, role="ROLE_CUSTOMER", typ="access")[0],
        "Bearer "
        + real.issue(customer_id, tokens.AUDIENCE_MARKETPLACE, -120, role="ROLE_CUSTOMER", typ="access")[0],
        "Bearer "
        + real.issue(customer_id, tokens.AUDIENCE_MARKETPLACE, 60, role="ROLE_ELIGIBLE_PARTY", typ="access")[
            0
        ],
        "Bearer "
        + real.issue("accounts/../x", tokens.AUDIENCE_MARKETPLACE, 60, role="ROLE_CUSTOMER", typ="access")[0],
        "Bearer " + real.issue("instances/x", tokens.AUDIENCE_MARKETPLACE, 60, typ="access")[0],
        "Bearer " + world.customer.refresh_token,
    ]


async def build_world(tmp: Path, **overrides: Any) -> World:
    market = await start_marketplace(world_config(tmp, **overrides))
    aiida = await start_aiida(AiidaDouble())
    world = World(
        market,
        aiida,
        await market.customer("Fuzz Customer"),
        await market.eligible_party("Fuzz EP"),
        await market.customer("Other Customer"),
        await market.eligible_party("Other EP"),
    )
    kinds = ("instance_id", "instance", "pairing_code", "data_request", "permission", "search")
    world.pools.update({kind: [] for kind in kinds})
    clients = (world.customer, world.ep, world.other_customer, world.other_ep)
    world.pools["account"] = [c.account.name for c in clients]  # type: ignore[union-attr]
    world.pools["email"] = [c.account.email for c in clients]  # type: ignore[union-attr]
    world.pools["refresh_token"] = [world.other_customer.refresh_token, "rt_" + "x" * 43]
    await register_and_claim(world, "fuzz-claimed-1", world.customer)
    await register_and_claim(world, "fuzz-unclaimed-1", None)
    await _data_request_with_permission(world, approve=None)
    await _data_request_with_permission(world, approve=True)
    world.pools["page_token"] = await _page_tokens(world)
    world.forged_tokens = _forged_tokens(world)
    return world


async def one_call(channel: grpc.aio.Channel) -> None:
    """Any cheap call that proves the server answers."""
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
