"""The Connect stream: one search-query answer per query, pongs, and status events.

The handler reads requests with `context.read` and writes each answer straight back with
`context.write`, in the call's own task (no per-message task or queue: the
fleet serves 10,000 streams and every microsecond per message shows). Status
events arrive independently, so they go through a small per-stream map (newest
state per permission, bounded by the number of accesses) drained by a short
task that starts only when there is something to send; one lock keeps the two
writers from overlapping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from aiida_stub.instance import AiidaInstance
from aiida_stub.matcher import matches
from eddie.aiida.v1 import aiida_pb2
from eddie_common.interceptors import well_formed
from eddie_common.logging import log_event

log = logging.getLogger(__name__)

EOF = grpc.aio.EOF

ConnectResponse = aiida_pb2.ConnectResponse
MatchReply = aiida_pb2.MatchReply
Pong = aiida_pb2.Pong


class StatusStream:
    """Sends one instance's status events on one Connect stream."""

    def __init__(self, context: Any, lock: asyncio.Lock) -> None:
        self._context = context
        self._lock = lock
        self._pending: dict[str, aiida_pb2.DataAccessStatus] = {}
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False

    def push(self, status: aiida_pb2.DataAccessStatus) -> None:
        if self._closed:
            return
        self._pending.pop(status.permission_id, None)  # re-insert: the newest state goes last
        self._pending[status.permission_id] = status
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending:
                permission_id = next(iter(self._pending))
                status = self._pending.pop(permission_id)
                async with self._lock:
                    await self._context.write(ConnectResponse(data_access_status=status))
        except Exception as exc:
            log_event(log, "status_not_sent", logging.DEBUG, error=type(exc).__name__)
            self._closed = True

    def close(self) -> None:
        self._closed = True
        if self._drainer is not None:
            self._drainer.cancel()


async def serve_connect(instance: AiidaInstance, context: Any) -> None:
    """Answers the marketplace on one Connect stream until it closes the stream."""
    lock = asyncio.Lock()
    statuses = StatusStream(context, lock)
    instance.attach_status_sink(statuses)
    profile = instance.profile
    read = context.read
    write = context.write
    log_event(log, "connect_opened", logging.DEBUG, instance=instance.instance_id)
    try:
        while (request := await read()) is not EOF:
            kind = well_formed(request).WhichOneof("message")
            if kind == "search_query":
                query = request.search_query
                verdict = matches(profile, query.data_need, time.time())
                reply = ConnectResponse(match_reply=MatchReply(query_id=query.query_id, matched=verdict))
            elif kind == "ping":
                reply = ConnectResponse(pong=Pong(sequence=request.ping.sequence))
            else:
                continue
            async with lock:
                await write(reply)
    finally:
        instance.detach_status_sink(statuses)
        statuses.close()
        log_event(log, "connect_closed", logging.DEBUG, instance=instance.instance_id)
