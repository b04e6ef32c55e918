"""IdentityService servicer: thin, delegates to services.identity."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import empty_pb2

from eddie.marketplace.v1 import identity_pb2, identity_pb2_grpc
from eddie_common.tokens import ALGORITHM
from marketplace_server.auth import principal
from marketplace_server.keyring import LiveKeys
from marketplace_server.ratelimit import peer_host
from marketplace_server.services.deletion import AccountDeletion
from marketplace_server.services.identity import IdentityService

Context = grpc.aio.ServicerContext[Any, Any]


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(
        self, service: IdentityService, keys: LiveKeys, issuer: str, deletion: AccountDeletion
    ) -> None:
        self.service = service
        self.keys = keys
        self.issuer = issuer
        self.deletion = deletion

    async def CreateAccount(
        self, request: identity_pb2.CreateAccountRequest, context: Context
    ) -> identity_pb2.Account:
        return await self.service.create_account(request)

    async def CreateToken(
        self, request: identity_pb2.CreateTokenRequest, context: Context
    ) -> identity_pb2.Token:
        return await self.service.login(request.email, request.password, peer_host(context.peer()))

    async def RefreshToken(
        self, request: identity_pb2.RefreshTokenRequest, context: Context
    ) -> identity_pb2.Token:
        return await self.service.refresh(request.refresh_token)

    async def GetCurrentAccount(
        self, request: identity_pb2.GetCurrentAccountRequest, context: Context
    ) -> identity_pb2.Account:
        return await self.service.get_account(principal().account_id)

    async def ListSigningKeys(
        self, request: identity_pb2.ListSigningKeysRequest, context: Context
    ) -> identity_pb2.ListSigningKeysResponse:
        ring = await self.keys.fresh()  # a rotation at another replica is listed at once
        return identity_pb2.ListSigningKeysResponse(
            signing_keys=[
                identity_pb2.SigningKey(key_id=k.key_id, algorithm=ALGORITHM, public_key_pem=k.public_pem)
                for k in ring.keys
            ],
            issuer=self.issuer,
        )

    async def DeleteAccount(
        self, request: identity_pb2.DeleteAccountRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.deletion.delete(request.name)
        return empty_pb2.Empty()
