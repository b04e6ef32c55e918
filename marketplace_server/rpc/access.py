"""AccessService servicer: thin; the workflow is in services.access and services.watch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from eddie.marketplace.v1 import access_pb2, access_pb2_grpc
from marketplace_server.services.access import AccessService
from marketplace_server.services.watch import PermissionWatch

Context = grpc.aio.ServicerContext[Any, Any]


class AccessServicer(access_pb2_grpc.AccessServiceServicer):
    def __init__(self, access: AccessService, watch: PermissionWatch) -> None:
        self.access = access
        self.watch = watch

    async def RequestAccess(
        self, request: access_pb2.RequestAccessRequest, context: Context
    ) -> access_pb2.RequestAccessResponse:
        return await self.access.request_access(request)

    async def GetPermission(
        self, request: access_pb2.GetPermissionRequest, context: Context
    ) -> access_pb2.Permission:
        return await self.access.get(request.name)

    async def ListPermissions(
        self, request: access_pb2.ListPermissionsRequest, context: Context
    ) -> access_pb2.ListPermissionsResponse:
        return await self.access.list(request)

    async def WatchPermissions(  # type: ignore[override]
        self, request: access_pb2.WatchPermissionsRequest, context: Context
    ) -> AsyncIterator[access_pb2.PermissionEvent]:
        async for event in self.watch.watch(request):
            yield event

    async def TerminatePermission(
        self, request: access_pb2.TerminatePermissionRequest, context: Context
    ) -> access_pb2.Permission:
        return await self.access.terminate(request)
