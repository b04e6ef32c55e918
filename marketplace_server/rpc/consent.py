"""ConsentService servicer: thin; the workflow is in services.consent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from eddie.marketplace.v1 import access_pb2, consent_pb2, consent_pb2_grpc
from marketplace_server.services.activities import ActivityFeed
from marketplace_server.services.consent import ConsentService
from marketplace_server.services.receipts import ReceiptService

Context = grpc.aio.ServicerContext[Any, Any]


class ConsentServicer(consent_pb2_grpc.ConsentServiceServicer):
    def __init__(self, consent: ConsentService, activities: ActivityFeed, receipts: ReceiptService) -> None:
        self.consent = consent
        self.activities = activities
        self.receipts = receipts

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[consent_pb2.ConnectRequest], context: Context
    ) -> AsyncIterator[consent_pb2.ConnectResponse]:
        async for response in self.consent.connect(request_iterator):
            yield response

    async def DecideAccess(
        self, request: consent_pb2.DecideAccessRequest, context: Context
    ) -> access_pb2.Permission:
        return await self.consent.decide_access(request)

    async def RevokePermission(
        self, request: consent_pb2.RevokePermissionRequest, context: Context
    ) -> access_pb2.Permission:
        return await self.consent.revoke(request)

    async def ListActivities(
        self, request: consent_pb2.ListActivitiesRequest, context: Context
    ) -> consent_pb2.ListActivitiesResponse:
        return await self.activities.list(request)

    async def ListConsentReceipts(
        self, request: consent_pb2.ListConsentReceiptsRequest, context: Context
    ) -> consent_pb2.ListConsentReceiptsResponse:
        return await self.receipts.list_receipts(request)

    async def GetConsentReceipt(
        self, request: consent_pb2.GetConsentReceiptRequest, context: Context
    ) -> consent_pb2.ConsentReceipt:
        return await self.receipts.get_receipt(request)
