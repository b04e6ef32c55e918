"""The client helper: a channel, sign-up/login, and one method per step of the workflows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import duration_pb2

from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import (
    access_pb2,
    access_pb2_grpc,
    consent_pb2,
    consent_pb2_grpc,
    data_request_pb2,
    data_request_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    instance_pb2,
    instance_pb2_grpc,
)
from eddie_common.channels import dial

ROLE_CUSTOMER = identity_pb2.ROLE_CUSTOMER
ROLE_ELIGIBLE_PARTY = identity_pb2.ROLE_ELIGIBLE_PARTY


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


def data_need(
    energy_type: str = "ELECTRICITY",
    tags: Sequence[str] = ("1-0:1.8.0",),
    min_granularity: float = 60,
    max_granularity: float = 900,
    history: float = 0,
    duration_s: float = 86400,
    regions: Sequence[str] = (),
) -> energy_pb2.DataNeed:
    """A DataNeed from plain values (granularities, history and duration in seconds)."""
    return energy_pb2.DataNeed(
        energy_type=energy_pb2.EnergyType.Value(f"ENERGY_TYPE_{energy_type}"),
        data_tags=list(tags),
        min_granularity=duration(min_granularity),
        max_granularity=duration(max_granularity),
        history=duration(history),
        duration=duration(duration_s),
        regions=list(regions),
    )


@dataclass
class Session:
    """One caller on a channel: its bearer access token ("" calls anonymously), the account and
    refresh token it signed in with, the five services' stubs, and one method per workflow step."""

    channel: grpc.aio.Channel
    token: str = ""
    account: identity_pb2.Account = field(default_factory=identity_pb2.Account)
    refresh_token: str = ""

    def __post_init__(self) -> None:
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.instances = instance_pb2_grpc.InstanceServiceStub(self.channel)
        self.data_requests = data_request_pb2_grpc.DataRequestServiceStub(self.channel)
        self.access = access_pb2_grpc.AccessServiceStub(self.channel)
        self.consent = consent_pb2_grpc.ConsentServiceStub(self.channel)

    @classmethod
    def signed_in(cls, channel: grpc.aio.Channel, token: identity_pb2.Token) -> Session:
        """The session of a CreateToken / RefreshToken answer."""
        return cls(channel, token.access_token, token.account, token.refresh_token)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The bearer metadata of every call (none when anonymous)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    # --- customer side ---

    async def claim(self, instance_id: str, pairing_code: str, wait: float = 0.0) -> instance_pb2.Instance:
        """Claims an AIIDA. An AIIDA registers itself at start-up, so a claim made right after
        starting it may find it unknown (NOT_FOUND); `wait` seconds of retries cover that."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return await self.instances.ClaimInstance(
                    instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=pairing_code),
                    metadata=self.metadata,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.2)

    async def list_instances(self) -> list[instance_pb2.Instance]:
        result: list[instance_pb2.Instance] = []
        token = ""
        while True:
            page = await self.instances.ListInstances(
                instance_pb2.ListInstancesRequest(page_size=500, page_token=token), metadata=self.metadata
            )
            result.extend(page.instances)
            token = page.next_page_token
            if not token:
                return result

    async def browse(self, **filters: Any) -> data_request_pb2.ListDataRequestsResponse:
        return await self.data_requests.ListDataRequests(
            data_request_pb2.ListDataRequestsRequest(**filters), metadata=self.metadata
        )

    async def decide(self, permission: str, approve: bool, reason: str = "") -> access_pb2.Permission:
        """Approves or rejects a pending access request (unary; apps usually use the Connect stream)."""
        return await self.consent.DecideAccess(
            consent_pb2.DecideAccessRequest(permission=permission, approve=approve, reason=reason),
            metadata=self.metadata,
        )

    async def revoke(self, permission: str, reason: str) -> access_pb2.Permission:
        """Ends one of the customer's accepted or active permissions."""
        return await self.consent.RevokePermission(
            consent_pb2.RevokePermissionRequest(name=permission, reason=reason), metadata=self.metadata
        )

    # --- eligible-party side ---

    async def create_data_request(
        self,
        title: str,
        purpose: str,
        need: energy_pb2.DataNeed,
        description: str = "",
        kind: int = data_request_pb2.DataRequest.KIND_DATA_REQUEST,
        policy_uri: str = "",
    ) -> data_request_pb2.DataRequest:
        return await self.data_requests.CreateDataRequest(
            data_request_pb2.CreateDataRequestRequest(
                data_request=data_request_pb2.DataRequest(
                    kind=kind,  # type: ignore[arg-type]
                    title=title,
                    description=description,
                    purpose=purpose,
                    policy_uri=policy_uri,
                    data_need=need,
                ),
                request_id=str(uuid.uuid4()),
            ),
            metadata=self.metadata,
        )

    async def search(
        self, data_request: str, timeout: float | None = None
    ) -> tuple[list[str], data_request_pb2.SearchSummary]:
        """Runs a search; returns the matched instance ids (in arrival order) and the summary."""
        request = data_request_pb2.SearchInstancesRequest(data_request=data_request)
        if timeout is not None:
            request.timeout.CopyFrom(duration(timeout))
        matches: list[str] = []
        summary = data_request_pb2.SearchSummary()
        async for response in self.data_requests.SearchInstances(request, metadata=self.metadata):
            if response.HasField("matches"):
                matches.extend(response.matches.instance_ids)
            else:
                summary = response.summary
        return matches, summary

    async def request_access(
        self, data_request: str, instance_ids: Sequence[str], sink_uri: str
    ) -> list[access_pb2.Permission]:
        response = await self.access.RequestAccess(
            access_pb2.RequestAccessRequest(
                data_request=data_request,
                instance_ids=list(instance_ids),
                sink_uri=sink_uri,
                request_id=str(uuid.uuid4()),
            ),
            metadata=self.metadata,
        )
        return list(response.permissions)

    async def get_permission(self, name: str) -> access_pb2.Permission:
        return await self.access.GetPermission(
            access_pb2.GetPermissionRequest(name=name), metadata=self.metadata
        )


class MarketplaceClient:
    """A channel to the marketplace; sign up and log in to get Sessions."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.channel = dial(address, credentials)
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channel)

    async def __aenter__(self) -> MarketplaceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.channel.close()

    async def log_in(self, email: str, password: str) -> Session:
        return await log_in(self.channel, email, password)

    async def sign_up(self, role: int, email: str, password: str, display_name: str) -> Session:
        """Creates the account (or reuses it if the e-mail exists) and logs in."""
        return await sign_up(self.channel, role, email, password, display_name, existing_ok=True)


async def log_in(channel: grpc.aio.Channel, email: str, password: str) -> Session:
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    token = await identity.CreateToken(identity_pb2.CreateTokenRequest(email=email, password=password))
    return Session.signed_in(channel, token)


async def sign_up(
    channel: grpc.aio.Channel,
    role: int,
    email: str,
    password: str,
    display_name: str,
    *,
    existing_ok: bool = False,
) -> Session:
    """Creates the account and logs in; an existing e-mail is ALREADY_EXISTS unless `existing_ok`."""
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    try:
        await identity.CreateAccount(
            identity_pb2.CreateAccountRequest(
                email=email,
                password=password,
                display_name=display_name,
                role=role,  # type: ignore[arg-type]
            )
        )
    except grpc.aio.AioRpcError as err:
        if not existing_ok or err.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    return await log_in(channel, email, password)


async def list_readings(sink_address: str, permission_id: str, token: str) -> list[Any]:
    """Every reading the EP's sink stored for one permission (all pages); none yet is `[]`.

    The sink answers NOT_FOUND for a permission it has not heard of, which is also the case
    before the AIIDA's first reading arrives.
    """
    async with grpc.aio.insecure_channel(sink_address) as channel:
        stub = data_sink_pb2_grpc.DataSinkServiceStub(channel)
        readings: list[Any] = []
        page = ""
        while True:
            try:
                response = await stub.ListReadings(
                    data_sink_pb2.ListReadingsRequest(
                        permission_id=permission_id, page_size=1000, page_token=page
                    ),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND and not readings:
                    return []
                raise
            readings.extend(response.readings)
            page = response.next_page_token
            if not page:
                return readings
