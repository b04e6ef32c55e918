"""The token tests' programs (a marketplace, a two-instance AIIDA fleet, an EP sink, in-process) and
calls to each of them with a given bearer."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from aiida_stub.server import AiidaApp
from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import identity_pb2, identity_pb2_grpc, instance_pb2_grpc
from eddie_client.client import Session
from eddie_common import tokens
from eddie_common.interceptors import error_info
from eddie_sink.server import SinkApp
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
FLEET_PREFIX = "tokfleet"
INSTANCE = f"{FLEET_PREFIX}-0"
OTHER_INSTANCE = f"{FLEET_PREFIX}-1"
PERMISSION = "perm-tokens-1"
OTHER_PERMISSION = "perm-tokens-2"
DOMAINS = {"marketplace": "marketplace.eddie", "aiida": "aiida.eddie", "sink": "framework.eddie"}
TARGETS = ("marketplace", "aiida", "sink-publish", "sink-list")
CALL_TIMEOUT = 5.0


@dataclass
class Programs:
    market: RunningMarketplace
    aiida: AiidaApp
    aiida_port: int
    aiida_channel: grpc.aio.Channel
    sink: SinkApp
    sink_channel: grpc.aio.Channel
    customer: Session
    ep: Session
    # A real sink token for PERMISSION, bound to `ep` and INSTANCE, as the marketplace's outbox mints it.
    sink_token: str = field(default="")

    @property
    def key(self) -> tokens.SigningKey:
        return self.market.app.signing_key

    @property
    def issuer(self) -> str:
        return self.market.app.config.issuer

    @property
    def ports(self) -> dict[str, int]:
        return {"marketplace": self.market.port, "aiida": self.aiida_port, "sink": self.sink.port}

    def aiida_token(self, instance_id: str) -> str:
        """The bearer the marketplace's connection manager sends to an instance (product code)."""
        metadata = dict(self.market.app.components["manager"].stream_metadata(instance_id))
        return str(metadata["authorization"]).removeprefix("Bearer ")

    def mint_sink_token(self, permission_id: str) -> str:
        """Claims as marketplace_server/aiida/outbox.py puts them in ConfigureDataAccess."""
        return self.market.app.issuer.issue(
            f"permissions/{permission_id}",
            tokens.AUDIENCE_SINK,
            300,
            permission_id=permission_id,
            eligible_party=self.ep_name,
            instance_id=INSTANCE,
        )[0]

    @property
    def ep_name(self) -> str:
        assert self.ep.account is not None
        return self.ep.account.name

    @property
    def customer_name(self) -> str:
        assert self.customer.account is not None
        return self.customer.account.name


# --- calling the programs ------------------------------------------------------------------------


def reading(permission_id: str = PERMISSION) -> energy_pb2.Reading:
    return energy_pb2.Reading(
        permission_id=permission_id,
        data_tag="1-0:1.8.0",
        value=1.5,
        unit="kWh",
        time=timestamp_pb2.Timestamp(seconds=1_700_000_000 + secrets.randbelow(10**6)),
    )


async def publish(p: Programs, authorization: str, permission_id: str = PERMISSION) -> int:
    stub = data_sink_pb2_grpc.DataSinkServiceStub(p.sink_channel)
    requests = iter([data_sink_pb2.PublishRequest(reading=reading(permission_id))])
    response = await stub.Publish(
        requests, metadata=(("authorization", authorization),), timeout=CALL_TIMEOUT
    )
    return int(response.accepted)


async def call(p: Programs, target: str, authorization: str, instance_id: str = INSTANCE) -> Any:
    """One call of the target's authenticated API with `authorization` metadata."""
    metadata: tuple[tuple[str, str], ...] = (("authorization", authorization),)
    if target == "marketplace":
        return await identity(p.market.channel).GetCurrentAccount(
            identity_pb2.GetCurrentAccountRequest(), metadata=metadata, timeout=CALL_TIMEOUT
        )
    if target == "aiida":
        return await aiida_pb2_grpc.AiidaServiceStub(p.aiida_channel).ListDataAccesses(
            aiida_pb2.ListDataAccessesRequest(),
            metadata=(*metadata, ("aiida-instance-id", instance_id)),
            timeout=CALL_TIMEOUT,
        )
    if target == "sink-publish":
        return await publish(p, authorization)
    assert target == "sink-list"
    return await data_sink_pb2_grpc.DataSinkServiceStub(p.sink_channel).ListReadings(
        data_sink_pb2.ListReadingsRequest(permission_id=PERMISSION), metadata=metadata, timeout=CALL_TIMEOUT
    )


def identity(channel: grpc.aio.Channel) -> identity_pb2_grpc.IdentityServiceAsyncStub:
    return identity_pb2_grpc.IdentityServiceStub(channel)


def instances(channel: grpc.aio.Channel) -> instance_pb2_grpc.InstanceServiceAsyncStub:
    return instance_pb2_grpc.InstanceServiceStub(channel)


def domain_of(target: str) -> str:
    return DOMAINS[target.split("-")[0]]


async def expect_refused(
    p: Programs,
    target: str,
    token: str,
    reason: str,
    code: grpc.StatusCode = UNAUTHENTICATED,
    instance_id: str = INSTANCE,
) -> grpc.aio.AioRpcError:
    err = await expect_error(call(p, target, f"Bearer {token}", instance_id), code, reason)
    info = error_info(err)
    assert info is not None
    assert info.domain == domain_of(target)
    return err
