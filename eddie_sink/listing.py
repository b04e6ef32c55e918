"""ListReadings: what arrived for one permission, shown only to its eligible party."""

from __future__ import annotations

from dataclasses import dataclass

from eddie.framework.v1 import data_sink_pb2
from eddie_common.errors import InvalidArgument, NotFound
from eddie_common.ids import MAX_PERMISSION_ID, is_permission_id
from eddie_common.page_tokens import PageTokenCodec, invalid_page_token, page_size
from eddie_sink.auth import Account
from eddie_sink.store import ReadingStore

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
METHOD_LIST = "ListReadings"


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: after (time_ns, data_tag) of `permission_id`."""

    permission_id: str
    time_ns: int
    data_tag: str


class ReadingPageTokens:
    """ListReadings page tokens: a cursor bound to its permission (see `eddie_common.page_tokens`)."""

    def __init__(self, key: bytes) -> None:
        self._codec = PageTokenCodec(key)

    def encode(self, cursor: Cursor) -> str:
        scope = {"permission": cursor.permission_id}
        return self._codec.encode(METHOD_LIST, scope, {"t": cursor.time_ns, "g": cursor.data_tag})

    def decode(self, token: str, permission_id: str) -> Cursor:
        """The cursor of `token`, which must have been issued for `permission_id`."""
        fields = self._codec.decode(token, METHOD_LIST, {"permission": permission_id})
        time_ns = fields.get("t") if fields else None
        data_tag = fields.get("g") if fields else None
        if not isinstance(time_ns, int) or isinstance(time_ns, bool) or not isinstance(data_tag, str):
            raise invalid_page_token()
        return Cursor(permission_id, time_ns, data_tag)


async def list_readings(
    store: ReadingStore,
    tokens: ReadingPageTokens,
    caller: Account,
    request: data_sink_pb2.ListReadingsRequest,
) -> data_sink_pb2.ListReadingsResponse:
    """One page of the permission's readings, oldest first by (time, data_tag)."""
    permission_id = request.permission_id
    if not is_permission_id(permission_id):
        raise InvalidArgument.for_field(
            "permission_id", f"required: 1 to {MAX_PERMISSION_ID} characters of [A-Za-z0-9_-]"
        )
    size = page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    # Someone else's permission looks exactly like one that does not exist.
    if await store.eligible_party_of(permission_id) != caller.name:
        raise NotFound(f"permission {permission_id!r} not found", reason="PERMISSION_NOT_FOUND")
    after = None
    if request.page_token:
        cursor = tokens.decode(request.page_token, permission_id)
        after = (cursor.time_ns, cursor.data_tag)
    rows = await store.list_readings(permission_id, after, size + 1)
    page = rows[:size]
    next_page_token = ""
    if len(rows) > size:
        last = page[-1]
        next_page_token = tokens.encode(Cursor(permission_id, last.time_ns, last.data_tag))
    return data_sink_pb2.ListReadingsResponse(
        readings=[row.to_proto() for row in page], next_page_token=next_page_token
    )
