"""Workflows 3 and 4: creating, reading, browsing and closing data requests.

Data requests are public to every signed-in user; only their owner may close
them. Browsing pages by keyset on `seq` (newest first), so requests created
while a client pages never shift the pages it has not read yet.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import data_request_pb2
from eddie_common.logging import log_event
from eddie_common.page_tokens import PageTokenCodec, page_size
from marketplace_server import idempotency
from marketplace_server.auth import principal, require_eligible_party
from marketplace_server.clock import utcnow
from marketplace_server.db.counters import next_value
from marketplace_server.db.models import AccountRow, DataRequestRow
from marketplace_server.errors import InvalidArgument, Validator
from marketplace_server.iso3166 import country_of, normalize_region
from marketplace_server.resources import (
    data_request_to_proto,
    ensure_owner,
    load_data_request,
    parse_account_name,
    parse_data_request_name,
    with_owner_name,
)
from marketplace_server.security import new_id
from marketplace_server.services.data_request_validation import NewDataRequest, validate_create
from marketplace_server.text import single_line

__all__ = ["DataRequestService", "ListFilters", "parse_list_filters"]

log = logging.getLogger(__name__)

DataRequest = data_request_pb2.DataRequest
METHOD_CREATE = "CreateDataRequest"
METHOD_LIST = "ListDataRequests"
SEQ_COUNTER = "data_requests"
MAX_TEXT_FILTER = 200
_LIKE_ESCAPE = "\\"


def _like_literal(text: str) -> str:
    """`text` with LIKE wildcards escaped (used with ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _contains(column: Any, text: str) -> ColumnElement[bool]:
    condition: ColumnElement[bool] = column.like(f"%{_like_literal(text)}%", escape=_LIKE_ESCAPE)
    return condition


def region_condition(region: str) -> ColumnElement[bool]:
    """Requests for anywhere, for `region` itself, and for its country or its subdivisions."""
    regions = DataRequestRow.regions
    if "-" in region:  # a subdivision: requests for it or its whole country
        related = [_contains(regions, f" {region} "), _contains(regions, f" {country_of(region)} ")]
    else:  # a country: requests for it or any of its subdivisions
        related = [_contains(regions, f" {region} "), _contains(regions, f" {region}-")]
    return or_(regions == "", *related)


@dataclass(frozen=True)
class ListFilters:
    """The validated filters of ListDataRequests; page tokens are bound to them."""

    kind: int = 0
    energy_type: int = 0
    region: str = ""
    text: str = ""
    owner_id: str = ""
    show_closed: bool = False

    def conditions(self) -> list[ColumnElement[bool]]:
        row = DataRequestRow
        conditions: list[ColumnElement[bool]] = []
        if not self.show_closed:
            conditions.append(row.state == DataRequest.STATE_OPEN)
        if self.kind:
            conditions.append(row.kind == self.kind)
        if self.energy_type:
            conditions.append(row.energy_type == self.energy_type)
        if self.owner_id:
            conditions.append(row.owner_id == self.owner_id)
        if self.region:
            conditions.append(region_condition(self.region))
        if self.text:
            conditions.append(_contains(row.search_text, self.text.lower()))
        return conditions


def parse_list_filters(request: data_request_pb2.ListDataRequestsRequest) -> ListFilters:
    v = Validator()
    v.check(request.kind in DataRequest.Kind.values(), "kind", "unknown kind")
    v.check(request.energy_type in energy_pb2.EnergyType.values(), "energy_type", "unknown energy type")
    region = normalize_region(request.region) if request.region else ""
    v.check(region is not None, "region", "must be an ISO 3166-1 alpha-2 or ISO 3166-2 code such as AT-9")
    owner_id = ""
    if request.owner:
        try:
            owner_id = parse_account_name(request.owner, "owner")
        except InvalidArgument as exc:
            v.violations.extend(exc.violations)
    text = request.text
    v.check(
        len(text) <= MAX_TEXT_FILTER and single_line(text),
        "text",
        f"at most {MAX_TEXT_FILTER} characters without control characters",
    )
    v.raise_if_any()
    return ListFilters(
        kind=request.kind,
        energy_type=request.energy_type,
        region=region or "",
        text=text,
        owner_id=owner_id,
        show_closed=request.show_closed,
    )


def _new_row(data_request_id: str, seq: int, owner_id: str, new: NewDataRequest) -> DataRequestRow:
    regions = list(new.data_need.regions)
    return DataRequestRow(
        id=data_request_id,
        seq=seq,
        kind=new.kind,
        title=new.title,
        description=new.description,
        purpose=new.purpose,
        policy_uri=new.policy_uri,
        data_need=new.data_need.SerializeToString(deterministic=True),
        energy_type=new.data_need.energy_type,
        regions=f" {' '.join(regions)} " if regions else "",
        search_text=f"{new.title}\n{new.description}".lower(),
        owner_id=owner_id,
        state=DataRequest.STATE_OPEN,
        create_time=utcnow(),
        close_time=None,
    )


class DataRequestService:
    """Data requests: create (eligible parties), get and list (anyone), close (owner)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], page_tokens: PageTokenCodec) -> None:
        self.sessions = sessions
        self.page_tokens = page_tokens

    async def create(
        self, request: data_request_pb2.CreateDataRequestRequest
    ) -> data_request_pb2.DataRequest:
        owner_id = require_eligible_party().account_id
        new = validate_create(request)
        request_id = request.request_id
        fingerprint = idempotency.fingerprint(new.canonical()) if request_id else ""

        async def create() -> data_request_pb2.DataRequest:
            row, owner_name, created = await self._insert(owner_id, new, request_id, fingerprint)
            if created:
                log_event(log, "data_request_created", data_request=row.id, owner=owner_id, seq=row.seq)
            return data_request_to_proto(row, owner_name)

        return await idempotency.create_once(
            self.sessions, owner_id, METHOD_CREATE, request_id, fingerprint, create, self._get_by_id
        )

    async def _insert(
        self, owner_id: str, new: NewDataRequest, request_id: str, fingerprint: str
    ) -> tuple[DataRequestRow, str, bool]:
        """The new row (or the earlier one of a replayed request id), its owner's name, and if it is new."""
        data_request_id = new_id()
        async with self.sessions.begin() as session:
            if request_id:
                earlier = await idempotency.find(session, owner_id, METHOD_CREATE, request_id, fingerprint)
                if earlier is not None:
                    return (*await load_data_request(session, earlier), False)
                await idempotency.remember(
                    session, owner_id, METHOD_CREATE, request_id, fingerprint, data_request_id
                )
            seq = await next_value(session, SEQ_COUNTER)
            row = _new_row(data_request_id, seq, owner_id, new)
            session.add(row)
            owner = await session.get(AccountRow, owner_id)
        return row, owner.display_name if owner else "", True

    async def get(self, name: str) -> data_request_pb2.DataRequest:
        principal()
        return await self._get_by_id(parse_data_request_name(name))

    async def _get_by_id(self, data_request_id: str) -> data_request_pb2.DataRequest:
        async with self.sessions() as session:
            row, owner_name = await load_data_request(session, data_request_id)
        return data_request_to_proto(row, owner_name)

    async def list(
        self, request: data_request_pb2.ListDataRequestsRequest
    ) -> data_request_pb2.ListDataRequestsResponse:
        principal()
        filters = parse_list_filters(request)
        size = page_size(request.page_size)
        bound = asdict(filters)
        after = self.page_tokens.decode_int(request.page_token, METHOD_LIST, bound, "seq")
        conditions = filters.conditions()
        page = with_owner_name().where(*conditions)
        if after is not None:
            page = page.where(DataRequestRow.seq < after)
        page = page.order_by(DataRequestRow.seq.desc()).limit(size + 1)
        count = select(func.count()).select_from(DataRequestRow).where(*conditions)
        async with self.sessions() as session:
            rows = (await session.execute(page)).all()
            total = (await session.execute(count)).scalar_one()
        rows, next_token = self.page_tokens.page(rows, size, METHOD_LIST, bound, lambda r: {"seq": r[0].seq})
        return data_request_pb2.ListDataRequestsResponse(
            data_requests=[data_request_to_proto(row, owner_name) for row, owner_name in rows],
            next_page_token=next_token,
            total_size=total,
        )

    async def close(self, name: str) -> data_request_pb2.DataRequest:
        account_id = require_eligible_party().account_id
        data_request_id = parse_data_request_name(name)
        async with self.sessions.begin() as session:
            row, owner_name = await load_data_request(session, data_request_id)
            ensure_owner(row, account_id, "close it")
            closed_now = row.state != DataRequest.STATE_CLOSED
            if closed_now:
                # Conditional, so a concurrent close keeps the first close_time.
                await session.execute(
                    update(DataRequestRow)
                    .where(DataRequestRow.id == row.id, DataRequestRow.state == DataRequest.STATE_OPEN)
                    .values(state=DataRequest.STATE_CLOSED, close_time=utcnow())
                    .execution_options(synchronize_session=False)
                )
                await session.refresh(row)
        if closed_now:
            log_event(log, "data_request_closed", data_request=row.id, owner=account_id)
        return data_request_to_proto(row, owner_name)
