"""InstanceService servicer: thin, delegates to services.instances."""

from __future__ import annotations

from typing import Any

import grpc

from eddie.marketplace.v1 import instance_pb2, instance_pb2_grpc
from marketplace_server.auth import principal
from marketplace_server.pagination import PageTokenCodec, page_size
from marketplace_server.ratelimit import peer_host
from marketplace_server.services.instances import InstanceService

Context = grpc.aio.ServicerContext[Any, Any]


class InstanceServicer(instance_pb2_grpc.InstanceServiceServicer):
    def __init__(
        self, service: InstanceService, public_key_pem: str, issuer: str, pages: PageTokenCodec
    ) -> None:
        self.service = service
        self.public_key_pem = public_key_pem
        self.issuer = issuer
        self.pages = pages

    async def RegisterInstance(
        self, request: instance_pb2.RegisterInstanceRequest, context: Context
    ) -> instance_pb2.RegisterInstanceResponse:
        row = await self.service.register(request)
        return instance_pb2.RegisterInstanceResponse(
            instance=self.service.to_proto(row),
            marketplace_public_key=self.public_key_pem,
            marketplace_issuer=self.issuer,
        )

    async def ClaimInstance(
        self, request: instance_pb2.ClaimInstanceRequest, context: Context
    ) -> instance_pb2.Instance:
        return self.service.to_proto(await self.service.claim(request, peer_host(context.peer())))

    async def GetInstance(
        self, request: instance_pb2.GetInstanceRequest, context: Context
    ) -> instance_pb2.Instance:
        return self.service.to_proto(await self.service.get(request.name))

    async def ListInstances(
        self, request: instance_pb2.ListInstancesRequest, context: Context
    ) -> instance_pb2.ListInstancesResponse:
        limit = page_size(request.page_size)
        scope = {"owner": principal().account_id}
        cursor = self.pages.decode(request.page_token, "ListInstances", scope) or {}
        after = cursor.get("after", "")
        rows = await self.service.list_owned(after if isinstance(after, str) else "", limit + 1)
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = self.pages.encode("ListInstances", scope, {"after": rows[-1].instance_id})
        return instance_pb2.ListInstancesResponse(
            instances=[self.service.to_proto(r) for r in rows], next_page_token=token
        )
