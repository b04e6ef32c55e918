"""The channel to the marketplace: which address, a reachability check that answers within
seconds, the caller's bearer token, and the transparent refresh of that token."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc

from eddie.marketplace.v1 import (
    access_pb2_grpc,
    consent_pb2_grpc,
    data_request_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    instance_pb2_grpc,
)
from eddie_cli.errors import SignedOut, Unreachable, from_rpc_error
from eddie_cli.session_store import StoredSession, load_session, save_session
from eddie_common.channels import dial
from eddie_common.interceptors import error_info

DEFAULT_MARKETPLACE = "127.0.0.1:50051"
CONNECT_TIMEOUT = 5.0  # an unreachable marketplace is reported after at most this long
CALL_TIMEOUT = 30.0  # deadline of every unary call

Request = TypeVar("Request")
Response = TypeVar("Response")
UnaryCall = Callable[..., Awaitable[Response]]


class ListResponse(Protocol):
    """A page of an AIP-158 List RPC."""

    @property
    def next_page_token(self) -> str: ...


Page = TypeVar("Page", bound=ListResponse)
Item = TypeVar("Item")


@dataclass(frozen=True)
class Target:
    """Where to connect: the address and, for TLS, a CA bundle."""

    address: str
    tls_ca: Path | None = None


def resolve_target(flag: str | None, tls_ca: Path | None) -> Target:
    """--marketplace / EDDIE_MARKETPLACE, else the signed-in session's marketplace, else the default."""
    if flag:
        return Target(flag, tls_ca)
    stored = load_session()
    return Target(stored.marketplace if stored else DEFAULT_MARKETPLACE, tls_ca)


async def ensure_reachable(channel: grpc.aio.Channel, address: str, timeout: float) -> None:
    """Returns once the channel is connected; a refused connection fails at once, silence after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            raise Unreachable(address, "connection failed (is marketplace-server running there?)")
        remaining = deadline - loop.time()
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), max(remaining, 0.0))
        except TimeoutError:
            raise Unreachable(address, f"no answer within {timeout:g} s") from None
        state = channel.get_state(try_to_connect=True)


class Connection:
    """One checked channel and the marketplace's stubs on it."""

    def __init__(self, target: Target) -> None:
        self.address = target.address
        tls = grpc.ssl_channel_credentials(target.tls_ca.read_bytes()) if target.tls_ca is not None else None
        self.channel = dial(target.address, tls)
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.instances = instance_pb2_grpc.InstanceServiceStub(self.channel)
        self.data_requests = data_request_pb2_grpc.DataRequestServiceStub(self.channel)
        self.access = access_pb2_grpc.AccessServiceStub(self.channel)
        self.consent = consent_pb2_grpc.ConsentServiceStub(self.channel)

    async def __aenter__(self) -> Connection:
        try:
            await ensure_reachable(self.channel, self.address, CONNECT_TIMEOUT)
        except BaseException:
            await self.channel.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.channel.close()

    async def call(self, method: UnaryCall[Response], request: object, **kwargs: object) -> Response:
        """A unary call with the CLI's deadline; a failure becomes a CliError."""
        try:
            return await method(request, timeout=CALL_TIMEOUT, **kwargs)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, self.address) from None


class SignedIn:
    """The stored session on a connection: bearer metadata, refreshed when it runs out.

    RefreshToken rotates the refresh token, so every refresh is written back at once.
    """

    def __init__(self, connection: Connection, stored: StoredSession) -> None:
        self.connection = connection
        self.stored = stored

    @property
    def account(self) -> identity_pb2.Account:
        return self.stored.account_proto

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.stored.access_token}"),)

    async def refresh(self) -> None:
        try:
            token = await self.connection.identity.RefreshToken(
                identity_pb2.RefreshTokenRequest(refresh_token=self.stored.refresh_token),
                timeout=CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise SignedOut("the session has expired; sign in again with `eddie login`") from None
            raise from_rpc_error(error, self.connection.address) from None
        self.stored = self.stored.refreshed(token)
        save_session(self.stored)

    async def fresh_metadata(self) -> tuple[tuple[str, str], ...]:
        """The bearer metadata, after a refresh if the access token is about to expire."""
        if not self.stored.access_token_fresh():
            await self.refresh()
        return self.metadata

    async def call(self, method: UnaryCall[Response], request: object) -> Response:
        """An authenticated unary call; an expired access token is refreshed and the call retried once."""
        metadata = await self.fresh_metadata()
        try:
            return await method(request, metadata=metadata, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            if (
                error.code() != grpc.StatusCode.UNAUTHENTICATED
                or info is None
                or info.reason != "TOKEN_EXPIRED"
            ):
                raise from_rpc_error(error, self.connection.address) from None
        await self.refresh()
        try:
            return await method(request, metadata=self.metadata, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, self.connection.address) from None

    async def pages(
        self,
        method: UnaryCall[Page],
        request: Any,
        items: Callable[[Page], Iterable[Item]],
        *,
        page_size: int,
        limit: int | None = None,
    ) -> tuple[list[Item], Page | None]:
        """The `items` of `method`'s pages, one call a page (each of at most `page_size`), until the
        last page or `limit` items; and the last page read. Sets the List `request`'s page fields."""
        found: list[Item] = []
        page: Page | None = None
        while limit is None or len(found) < limit:
            request.page_size = page_size if limit is None else min(page_size, limit - len(found))
            page = await self.call(method, request)
            found.extend(items(page))
            request.page_token = page.next_page_token
            if not page.next_page_token:
                break
        return found, page


def signed_in(connection: Connection) -> SignedIn:
    """The session for this connection's marketplace, or SignedOut explaining how to get one."""
    stored = load_session()
    if stored is None:
        raise SignedOut("not signed in; run `eddie login --email E` (or `eddie signup`) first")
    if stored.marketplace != connection.address:
        raise SignedOut(
            f"signed in at {stored.marketplace}, not at {connection.address}; "
            f"run `eddie --marketplace {connection.address} login`"
        )
    return SignedIn(connection, stored)


def environment_password() -> str | None:
    """EDDIE_PASSWORD, for scripts (an empty value counts as unset)."""
    return os.environ.get("EDDIE_PASSWORD") or None
