"""The AiidaService servicer: thin; the interceptor authenticates and picks the instance."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiida_stub.auth import current_instance
from aiida_stub.connect import serve_connect
from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc


class AiidaServiceServicer(aiida_pb2_grpc.AiidaServiceServicer):
    """Serves every instance of the process; each call acts on the instance named by its metadata."""

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[aiida_pb2.ConnectRequest], context: Any
    ) -> None:
        # grpc.aio's reader/writer form (a coroutine, not an async generator): requests are read
        # with context.read() and replies written with context.write() (see connect.py), with no
        # async-generator layer per stream or per message; a fleet serves 10,000 of these.
        await serve_connect(current_instance(), context)

    async def ConfigureDataAccess(  # type: ignore[override]
        self, request: aiida_pb2.ConfigureDataAccessRequest, context: Any
    ) -> aiida_pb2.DataAccess:
        access = await current_instance().configure_access(request)
        return access.to_proto()

    async def RevokeDataAccess(  # type: ignore[override]
        self, request: aiida_pb2.RevokeDataAccessRequest, context: Any
    ) -> aiida_pb2.DataAccess:
        access = await current_instance().revoke_access(request.permission_id, request.reason)
        return access.to_proto()

    async def GetDataAccess(  # type: ignore[override]
        self, request: aiida_pb2.GetDataAccessRequest, context: Any
    ) -> aiida_pb2.DataAccess:
        return current_instance().get_access(request.permission_id).to_proto()

    async def ListDataAccesses(  # type: ignore[override]
        self, request: aiida_pb2.ListDataAccessesRequest, context: Any
    ) -> aiida_pb2.ListDataAccessesResponse:
        accesses = current_instance().list_accesses()
        return aiida_pb2.ListDataAccessesResponse(data_accesses=[a.to_proto() for a in accesses])
