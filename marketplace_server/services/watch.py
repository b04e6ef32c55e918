"""WatchPermissions: an eligible party's permissions as they are, then every change.

The stream subscribes to the event hub before it reads the snapshot, so no
change between the two is lost; events the snapshot already shows are skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy import select

from eddie.marketplace.v1 import access_pb2
from marketplace_server.auth import require_eligible_party
from marketplace_server.db.models import PermissionRow
from marketplace_server.resources import (
    ensure_owner,
    load_data_request,
    parse_data_request_name,
    parse_permission_name,
    permission_to_proto,
)
from marketplace_server.services.events import Event, EventHub, PermissionChanged
from marketplace_server.services.permissions import PermissionLedger
from marketplace_server.services.timeouts import DecisionTimeouts

__all__ = ["PermissionWatch"]

SNAPSHOT_PAGE = 500
# permission id -> (update_time in ns, state) as the snapshot showed it
Snapshot = dict[str, tuple[int, int]]


def _already_shown(event: PermissionChanged, snapshot: Snapshot) -> bool:
    permission_id = parse_permission_name(event.permission.name)
    shown = snapshot.get(permission_id)
    if shown is None:
        return False
    update_time = event.permission.update_time.ToNanoseconds()
    if update_time < shown[0] or (update_time == shown[0] and event.permission.state == shown[1]):
        return True
    del snapshot[permission_id]  # every later event of it is newer
    return False


class PermissionWatch:
    """Serves WatchPermissions."""

    def __init__(self, ledger: PermissionLedger, hub: EventHub, timeouts: DecisionTimeouts) -> None:
        self.sessions = ledger.sessions
        self.hub = hub
        self.timeouts = timeouts

    async def _check_owner(self, caller: str, data_request_id: str) -> None:
        async with self.sessions() as session:
            row, _ = await load_data_request(session, data_request_id)
        ensure_owner(row, caller, "watch it")

    async def watch(
        self, request: access_pb2.WatchPermissionsRequest
    ) -> AsyncIterator[access_pb2.PermissionEvent]:
        caller = require_eligible_party().account_id
        data_request_id = ""
        if request.data_request:
            data_request_id = parse_data_request_name(request.data_request, "data_request")
            await self._check_owner(caller, data_request_id)

        def accepts(event: Event) -> bool:
            return isinstance(event, PermissionChanged) and data_request_id in ("", event.data_request_id)

        with self.hub.subscribe(caller, accepts) as subscriber:
            await self.timeouts.expire_due(PermissionRow.eligible_party_id == caller)
            snapshot: Snapshot = {}
            async for row in self._current(caller, data_request_id):
                permission = permission_to_proto(row)
                snapshot[row.id] = (permission.update_time.ToNanoseconds(), row.state)
                yield access_pb2.PermissionEvent(permission=permission)
            while True:
                event = await subscriber.next()
                if isinstance(event, PermissionChanged) and not _already_shown(event, snapshot):
                    yield access_pb2.PermissionEvent(
                        permission=event.permission,
                        previous_state=event.previous_state,
                    )

    async def _current(self, caller: str, data_request_id: str) -> AsyncIterator[PermissionRow]:
        """The caller's permissions, oldest first, read page by page."""
        after = 0
        while True:
            query = select(PermissionRow).where(
                PermissionRow.eligible_party_id == caller, PermissionRow.seq > after
            )
            if data_request_id:
                query = query.where(PermissionRow.data_request_id == data_request_id)
            async with self.sessions() as session:
                rows = list(await session.scalars(query.order_by(PermissionRow.seq).limit(SNAPSHOT_PAGE)))
            for row in rows:
                yield row
            if len(rows) < SNAPSHOT_PAGE:
                return
            after = rows[-1].seq
