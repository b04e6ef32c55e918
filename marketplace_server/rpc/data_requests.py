"""DataRequestService servicer: thin; CRUD/browse in services.data_requests, search in services.search."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from eddie.marketplace.v1 import data_request_pb2, data_request_pb2_grpc
from marketplace_server.services.data_requests import DataRequestService
from marketplace_server.services.search import SearchService

Context = grpc.aio.ServicerContext[Any, Any]


class DataRequestServicer(data_request_pb2_grpc.DataRequestServiceServicer):
    def __init__(self, data_requests: DataRequestService, search: SearchService) -> None:
        self.data_requests = data_requests
        self.search = search

    # --- CRUD and browsing (services.data_requests) ---

    async def CreateDataRequest(
        self, request: data_request_pb2.CreateDataRequestRequest, context: Context
    ) -> data_request_pb2.DataRequest:
        return await self.data_requests.create(request)

    async def GetDataRequest(
        self, request: data_request_pb2.GetDataRequestRequest, context: Context
    ) -> data_request_pb2.DataRequest:
        return await self.data_requests.get(request.name)

    async def ListDataRequests(
        self, request: data_request_pb2.ListDataRequestsRequest, context: Context
    ) -> data_request_pb2.ListDataRequestsResponse:
        return await self.data_requests.list(request)

    async def CloseDataRequest(
        self, request: data_request_pb2.CloseDataRequestRequest, context: Context
    ) -> data_request_pb2.DataRequest:
        return await self.data_requests.close(request.name)

    # --- Search (services.search) ---

    def SearchInstances(  # type: ignore[override]
        self, request: data_request_pb2.SearchInstancesRequest, context: Context
    ) -> AsyncIterator[data_request_pb2.SearchInstancesResponse]:
        # The service's generator itself, not a re-yielding wrapper: one layer less per match.
        return self.search.search(request, context.time_remaining())

    async def GetSearch(
        self, request: data_request_pb2.GetSearchRequest, context: Context
    ) -> data_request_pb2.Search:
        return await self.search.get_search(request.name)
