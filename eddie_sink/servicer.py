"""The DataSinkService servicer: authentication is done by the interceptor, storage by the store."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie_common.logging import log_event
from eddie_sink.auth import current_account, current_publisher
from eddie_sink.ends import PermissionEnds
from eddie_sink.listing import ReadingPageTokens, list_readings
from eddie_sink.readings import accept_reading
from eddie_sink.store import ReadingStore
from eddie_sink.writer import ReadingWriter, StreamReceipts

log = logging.getLogger(__name__)


class DataSinkServicer(data_sink_pb2_grpc.DataSinkServiceServicer):
    """Receives readings from AIIDAs and lets the eligible party list them."""

    def __init__(
        self,
        store: ReadingStore,
        writer: ReadingWriter,
        page_tokens: ReadingPageTokens,
        ends: PermissionEnds,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._on_refused = on_refused
        self._store = store
        self._writer = writer
        self._page_tokens = page_tokens
        self._ends = ends

    async def Publish(  # type: ignore[override]
        self, request_iterator: AsyncIterator[data_sink_pb2.PublishRequest], context: Any
    ) -> data_sink_pb2.PublishResponse:
        publisher = current_publisher()
        ends = self._ends
        ends.ensure_live(publisher.permission_id)
        await self._store.record_permission(
            publisher.permission_id, publisher.eligible_party, publisher.instance_id
        )
        await ends.follow(publisher)
        log_event(
            log,
            "reading_stream_opened",
            logging.DEBUG,  # at INFO, hundreds of lines a second for a reconnecting fleet; "closed" stays
            permission=publisher.permission_id,
            instance=publisher.instance_id,
        )
        # Headers now tell the AIIDA its stream is accepted (token checked, handler running), not only
        # at the end of the stream; the churn soak (bench/sink_churn.py) measures acceptance with them.
        await context.send_initial_metadata(())
        receipts = StreamReceipts()
        accepted = 0
        try:
            async for request in request_iterator:
                reading = accept_reading(request, publisher.permission_id)
                ends.ensure_live(publisher.permission_id)
                receipts.add(await self._writer.submit(reading))
                accepted += 1
            await receipts.wait_all()
        except Exception as exc:
            # What the stream delivered before the bad message stays stored; commit it first.
            await receipts.settle()
            reason = getattr(exc, "reason", type(exc).__name__)
            if self._on_refused is not None:
                self._on_refused(str(reason))
            log_event(
                log,
                "reading_stream_failed",
                permission=publisher.permission_id,
                accepted=accepted,
                error=reason,
            )
            raise
        log_event(log, "reading_stream_closed", permission=publisher.permission_id, accepted=accepted)
        return data_sink_pb2.PublishResponse(accepted=accepted)

    async def ListReadings(  # type: ignore[override]
        self, request: data_sink_pb2.ListReadingsRequest, context: Any
    ) -> data_sink_pb2.ListReadingsResponse:
        return await list_readings(self._store, self._page_tokens, current_account(), request)
