"""InstanceService servicer: thin, delegates to services.instances."""

from __future__ import annotations

from typing import Any

import grpc

from eddie.marketplace.v1 import instance_pb2, instance_pb2_grpc
from marketplace_server.ratelimit import peer_host
from marketplace_server.services.instances import InstanceService

Context = grpc.aio.ServicerContext[Any, Any]


class InstanceServicer(instance_pb2_grpc.InstanceServiceServicer):
    def __init__(self, service: InstanceService) -> None:
        self.service = service

    async def RegisterInstance(
        self, request: instance_pb2.RegisterInstanceRequest, context: Context
    ) -> instance_pb2.RegisterInstanceResponse:
        return await self.service.register(request)

    async def ClaimInstance(
        self, request: instance_pb2.ClaimInstanceRequest, context: Context
    ) -> instance_pb2.Instance:
        return await self.service.claim(request, peer_host(context.peer()))

    async def GetInstance(
        self, request: instance_pb2.GetInstanceRequest, context: Context
    ) -> instance_pb2.Instance:
        return await self.service.get(request.name)

    async def ListInstances(
        self, request: instance_pb2.ListInstancesRequest, context: Context
    ) -> instance_pb2.ListInstancesResponse:
        return await self.service.list(request)
