"""The household's audit feed (ConsentService.ListActivities).

Two sources, merged newest first:

- searches: derived from the stored searches, never written per instance (that
  would cost the search path). A search "asked" an instance when it started
  while the instance was claimed by the caller: every search is sent to every
  claimed instance. An instance that was offline or did not answer in time is
  listed too, with `matched = false` (the marketplace keeps only counts of those,
  not ids). A withheld search (singling-out floor) kept no ids either, so it
  also shows `matched = false`.
- permission steps: one entry per row of `permission_transitions` of the
  caller's permissions on the instance.

Paging is keyset over (time, source, id), carried in the signed page token, so a
page boundary never drops or repeats an entry when new ones arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import access_pb2, consent_pb2
from eddie_common.page_tokens import PageTokenCodec, invalid_page_token, page_size
from marketplace_server.auth import require_customer
from marketplace_server.clock import to_timestamp
from marketplace_server.db.match_sets import searches_matching
from marketplace_server.db.models import (
    AccountRow,
    DataRequestRow,
    InstanceRow,
    PermissionRow,
    PermissionTransitionRow,
    SearchRow,
)
from marketplace_server.errors import NotFound
from marketplace_server.resources import data_request_name, parse_instance_name, permission_name, search_name

__all__ = ["ActivityFeed", "kind_of_state"]

Activity = consent_pb2.Activity
Permission = access_pb2.Permission
METHOD_LIST = "ListActivities"
SEARCH, STEP = 0, 1  # source ranks: at equal times a permission step sorts above a search
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_KIND_OF_STATE: dict[int, Activity.Kind.ValueType] = {
    Permission.STATE_PENDING: Activity.KIND_ACCESS_REQUESTED,
    Permission.STATE_ACCEPTED: Activity.KIND_ACCESS_APPROVED,
    Permission.STATE_REJECTED: Activity.KIND_ACCESS_REJECTED,
    Permission.STATE_ACTIVE: Activity.KIND_ACCESS_STARTED,
}


def kind_of_state(state: int) -> Activity.Kind.ValueType:
    """The feed kind of a step into `state`: every other (terminal) state ends the access."""
    return _KIND_OF_STATE.get(state, Activity.KIND_ACCESS_ENDED)


def _micros(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(microseconds=1)


def _from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


@dataclass(frozen=True, order=True)
class _Key:
    """The feed's total order (compared descending): time, then source, then the row's id."""

    micros: int
    source: int
    search_id: str = ""
    step_id: int = 0

    def cursor(self) -> dict[str, Any]:
        return {"t": self.micros, "s": self.source, "i": self.search_id, "n": self.step_id}

    @classmethod
    def from_cursor(cls, cursor: dict[str, Any]) -> _Key:
        t, s, i, n = (cursor.get(k) for k in ("t", "s", "i", "n"))
        ints = [v for v in (t, s, n) if isinstance(v, int) and not isinstance(v, bool)]
        if len(ints) != 3 or not isinstance(i, str) or s not in (SEARCH, STEP):
            raise invalid_page_token()
        return cls(int(t), int(s), i, int(n))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Entry:
    key: _Key
    activity: Activity


class ActivityFeed:
    """ListActivities for the caller's own instances."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], pages: PageTokenCodec) -> None:
        self.sessions = sessions
        self.pages = pages

    async def list(self, request: consent_pb2.ListActivitiesRequest) -> consent_pb2.ListActivitiesResponse:
        caller = require_customer().account_id
        instance_id = parse_instance_name(request.instance, "instance")
        size = page_size(request.page_size)
        bound = {"account": caller, "instance": instance_id}
        cursor = self.pages.decode(request.page_token, METHOD_LIST, bound)
        before = _Key.from_cursor(cursor) if cursor is not None else None
        async with self.sessions() as session:
            instance = await session.get(InstanceRow, instance_id)
            if instance is None or instance.owner_id != caller or instance.claim_time is None:
                raise NotFound(f"instance {instance_id} not found", reason="INSTANCE_NOT_FOUND")
            entries = await _searches(session, instance, before, size + 1)
            entries += await _steps(session, instance_id, caller, before, size + 1)
        entries.sort(key=lambda e: e.key, reverse=True)
        entries, token = self.pages.page(entries, size, METHOD_LIST, bound, lambda e: e.key.cursor())
        return consent_pb2.ListActivitiesResponse(
            activities=[e.activity for e in entries], next_page_token=token
        )


def _before(time_column: Any, id_column: Any, source: int, key: _Key | None, id_value: object) -> Any:
    """SQL for "(time, source, id) < key" on one source's rows (True without a key)."""
    if key is None:
        return true()
    at = _from_micros(key.micros)
    same_time = and_(time_column == at, id_column < id_value) if key.source == source else true()
    if source > key.source:  # this source sorts above the cursor's at equal times: none qualify
        return time_column < at
    return or_(time_column < at, and_(time_column == at, same_time))


async def _searches(
    session: AsyncSession, instance: InstanceRow, before: _Key | None, limit: int
) -> list[_Entry]:
    """The searches that asked the instance since its claim, newest first."""
    claim_time = instance.claim_time
    assert claim_time is not None
    rows = (
        await session.execute(
            select(SearchRow, DataRequestRow.purpose, AccountRow.display_name)
            .join(DataRequestRow, DataRequestRow.id == SearchRow.data_request_id)
            .outerjoin(AccountRow, AccountRow.id == DataRequestRow.owner_id)
            .where(
                SearchRow.create_time >= claim_time,
                _before(SearchRow.create_time, SearchRow.id, SEARCH, before, before and before.search_id),
            )
            .order_by(SearchRow.create_time.desc(), SearchRow.id.desc())
            .limit(limit)
        )
    ).all()
    # Stored at its end: a search that began before the claim did not ask this instance.
    asked = [r for r in rows if r[0].create_time - timedelta(milliseconds=r[0].elapsed_ms) >= claim_time]
    matched = await searches_matching(session, [r[0].id for r in asked], instance.instance_id)
    return [
        _Entry(
            _Key(_micros(search.create_time), SEARCH, search_id=search.id),
            Activity(
                instance_id=instance.instance_id,
                kind=Activity.KIND_SEARCH,
                time=to_timestamp(search.create_time),
                data_request=data_request_name(search.data_request_id),
                eligible_party_display_name=display_name or "",
                purpose=purpose,
                matched=search.id in matched,
                search=search_name(search.data_request_id, search.id),
            ),
        )
        for search, purpose, display_name in asked
    ]


async def _steps(
    session: AsyncSession, instance_id: str, customer_id: str, before: _Key | None, limit: int
) -> list[_Entry]:
    """Every state change of the customer's permissions on the instance, newest first."""
    rows = (
        await session.execute(
            select(PermissionTransitionRow, PermissionRow.data_request_id, DataRequestRow.purpose)
            .add_columns(AccountRow.display_name)
            .join(PermissionRow, PermissionRow.id == PermissionTransitionRow.permission_id)
            .join(DataRequestRow, DataRequestRow.id == PermissionRow.data_request_id)
            .outerjoin(AccountRow, AccountRow.id == PermissionRow.eligible_party_id)
            .where(
                PermissionRow.instance_id == instance_id,
                PermissionRow.customer_id == customer_id,
                _before(
                    PermissionTransitionRow.time,
                    PermissionTransitionRow.id,
                    STEP,
                    before,
                    before and before.step_id,
                ),
            )
            .order_by(PermissionTransitionRow.time.desc(), PermissionTransitionRow.id.desc())
            .limit(limit)
        )
    ).all()
    return [
        _Entry(
            _Key(_micros(step.time), STEP, step_id=step.id),
            Activity(
                instance_id=instance_id,
                kind=kind_of_state(step.to_state),
                time=to_timestamp(step.time),
                data_request=data_request_name(data_request_id),
                eligible_party_display_name=display_name or "",
                purpose=purpose,
                permission=permission_name(step.permission_id),
                state=step.to_state,  # type: ignore[arg-type]
                reason=step.reason,
            ),
        )
        for step, data_request_id, purpose, display_name in rows
    ]
