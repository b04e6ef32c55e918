"""ListReadings: what arrived for one permission, shown only to its eligible party."""

from __future__ import annotations

from eddie.framework.v1 import data_sink_pb2
from eddie_common.errors import InvalidArgument, NotFound
from eddie_sink.auth import Account
from eddie_sink.page_tokens import Cursor, PageTokens
from eddie_sink.store import ReadingStore

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_PERMISSION_ID_LENGTH = 128


def page_size_of(request: data_sink_pb2.ListReadingsRequest) -> int:
    if request.page_size < 0:
        raise InvalidArgument.for_field("page_size", "must not be negative")
    return min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


async def list_readings(
    store: ReadingStore, tokens: PageTokens, caller: Account, request: data_sink_pb2.ListReadingsRequest
) -> data_sink_pb2.ListReadingsResponse:
    """One page of the permission's readings, oldest first by (time, data_tag)."""
    permission_id = request.permission_id
    if not permission_id or len(permission_id) > MAX_PERMISSION_ID_LENGTH:
        raise InvalidArgument.for_field("permission_id", "required, at most 128 characters")
    page_size = page_size_of(request)
    # Someone else's permission looks exactly like one that does not exist.
    if await store.eligible_party_of(permission_id) != caller.name:
        raise NotFound(f"permission {permission_id!r} not found", reason="PERMISSION_NOT_FOUND")
    after = None
    if request.page_token:
        cursor = tokens.decode(request.page_token, permission_id)
        after = (cursor.time_ns, cursor.data_tag)
    rows = await store.list_readings(permission_id, after, page_size + 1)
    page = rows[:page_size]
    next_page_token = ""
    if len(rows) > page_size:
        last = page[-1]
        next_page_token = tokens.encode(Cursor(permission_id, last.time_ns, last.data_tag))
    return data_sink_pb2.ListReadingsResponse(
        readings=[row.to_proto() for row in page], next_page_token=next_page_token
    )
