"""The marketplace's protobuf resources: names, converters, and the reads every workflow shares.

One builder and one parser per resource name (GAPIC's `*_path` / `parse_*_path`),
each with one id rule, so the same malformed or unknown name gets the same answer
from every RPC. Rows become messages only here. Below `rpc/` and `services/`:
it imports neither.
"""

from __future__ import annotations

import re

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import access_pb2, data_request_pb2, identity_pb2, instance_pb2
from marketplace_server.clock import to_timestamp
from marketplace_server.db.models import AccountRow, DataRequestRow, InstanceRow, PermissionRow
from marketplace_server.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

__all__ = [
    "INSTANCE_ID",
    "RESOURCE_ID",
    "account_name",
    "account_to_proto",
    "data_request_name",
    "data_request_not_found",
    "data_request_to_proto",
    "ensure_owned_open",
    "ensure_owner",
    "instance_name",
    "instance_to_proto",
    "is_instance_id",
    "is_permission_id",
    "load_data_request",
    "load_data_requests",
    "parse_account_name",
    "parse_data_request_name",
    "parse_instance_name",
    "parse_permission_name",
    "parse_search_name",
    "permission_name",
    "permission_to_proto",
    "search_name",
    "with_owner_name",
]

# Ids the marketplace mints (accounts, data requests, searches, permissions): `security.new_id`
# makes 22 characters; 32 leaves room and is the width of their columns.
RESOURCE_ID = r"[A-Za-z0-9_-]{1,32}"
# An AIIDA chooses its own id (see instance.proto).
INSTANCE_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{2,63}"

_ACCOUNT = re.compile(rf"accounts/({RESOURCE_ID})", re.ASCII)
_INSTANCE = re.compile(rf"instances/({INSTANCE_ID})", re.ASCII)
_DATA_REQUEST = re.compile(rf"dataRequests/({RESOURCE_ID})", re.ASCII)
_SEARCH = re.compile(rf"dataRequests/({RESOURCE_ID})/searches/({RESOURCE_ID})", re.ASCII)
_PERMISSION = re.compile(rf"permissions/({RESOURCE_ID})", re.ASCII)
_INSTANCE_ID = re.compile(INSTANCE_ID, re.ASCII)
_PERMISSION_ID = re.compile(RESOURCE_ID, re.ASCII)

DataRequest = data_request_pb2.DataRequest

# --- names ---


def account_name(account_id: str) -> str:
    return f"accounts/{account_id}"


def instance_name(instance_id: str) -> str:
    return f"instances/{instance_id}"


def data_request_name(data_request_id: str) -> str:
    return f"dataRequests/{data_request_id}"


def search_name(data_request_id: str, search_id: str) -> str:
    return f"{data_request_name(data_request_id)}/searches/{search_id}"


def permission_name(permission_id: str) -> str:
    return f"permissions/{permission_id}"


def _parse(pattern: re.Pattern[str], name: str, field: str, shape: str) -> re.Match[str]:
    match = pattern.fullmatch(name)
    if match is None:
        raise InvalidArgument.for_field(field, "required" if not name else f"must be {shape}")
    return match


def parse_account_name(name: str, field: str = "name") -> str:
    """The id of an `accounts/{id}` name, or INVALID_ARGUMENT naming `field`."""
    return _parse(_ACCOUNT, name, field, "accounts/{id}").group(1)


def parse_instance_name(name: str, field: str = "name") -> str:
    """The id of an `instances/{instance_id}` name, or INVALID_ARGUMENT naming `field`."""
    return _parse(_INSTANCE, name, field, "instances/{instance_id}").group(1)


def parse_data_request_name(name: str, field: str = "name") -> str:
    """The id of a `dataRequests/{id}` name, or INVALID_ARGUMENT naming `field`."""
    return _parse(_DATA_REQUEST, name, field, "dataRequests/{id}").group(1)


def parse_search_name(name: str, field: str = "name") -> tuple[str, str]:
    """(data request id, search id) of a `dataRequests/{id}/searches/{id}` name."""
    match = _parse(_SEARCH, name, field, "dataRequests/{id}/searches/{id}")
    return match.group(1), match.group(2)


def parse_permission_name(name: str, field: str = "name") -> str:
    """The id of a `permissions/{id}` name, or INVALID_ARGUMENT naming `field`."""
    return _parse(_PERMISSION, name, field, "permissions/{id}").group(1)


def is_instance_id(text: str) -> bool:
    return _INSTANCE_ID.fullmatch(text) is not None


def is_permission_id(text: str) -> bool:
    return _PERMISSION_ID.fullmatch(text) is not None


# --- rows to messages ---


def account_to_proto(row: AccountRow) -> identity_pb2.Account:
    return identity_pb2.Account(
        name=account_name(row.id),
        email=row.email,
        display_name=row.display_name,
        role=row.role,
        create_time=to_timestamp(row.create_time),
    )


def instance_to_proto(row: InstanceRow, connected: bool) -> instance_pb2.Instance:
    return instance_pb2.Instance(
        name=instance_name(row.instance_id),
        instance_id=row.instance_id,
        address=row.address,
        owner=account_name(row.owner_id) if row.owner_id else "",
        state=instance_pb2.Instance.STATE_CLAIMED if row.owner_id else instance_pb2.Instance.STATE_REGISTERED,
        connected=connected,
        register_time=to_timestamp(row.register_time),
        claim_time=to_timestamp(row.claim_time),
        last_seen_time=to_timestamp(row.last_seen_time),
    )


def data_request_to_proto(row: DataRequestRow, owner_display_name: str) -> data_request_pb2.DataRequest:
    return data_request_pb2.DataRequest(
        name=data_request_name(row.id),
        kind=row.kind,
        title=row.title,
        description=row.description,
        purpose=row.purpose,
        policy_uri=row.policy_uri,
        data_need=energy_pb2.DataNeed.FromString(row.data_need),
        owner=account_name(row.owner_id),
        owner_display_name=owner_display_name,
        state=row.state,
        create_time=to_timestamp(row.create_time),
        close_time=to_timestamp(row.close_time),
    )


def permission_to_proto(row: PermissionRow) -> access_pb2.Permission:
    return access_pb2.Permission(
        name=permission_name(row.id),
        data_request=data_request_name(row.data_request_id),
        instance_id=row.instance_id,
        eligible_party=account_name(row.eligible_party_id),
        customer=account_name(row.customer_id),
        state=row.state,
        state_reason=row.state_reason,
        sink_uri=row.sink_uri,
        create_time=to_timestamp(row.create_time),
        decide_time=to_timestamp(row.decide_time),
        start_time=to_timestamp(row.start_time),
        end_time=to_timestamp(row.end_time),
        update_time=to_timestamp(row.update_time),
        decision_deadline=to_timestamp(row.decision_deadline),
    )


# --- data requests with their owners' names, and who may act on them ---


def with_owner_name() -> Select[DataRequestRow, str]:
    """Data requests joined with their owner's display name (what a DataRequest message shows)."""
    return select(DataRequestRow, AccountRow.display_name).join(
        AccountRow, AccountRow.id == DataRequestRow.owner_id
    )


def data_request_not_found(data_request_id: str) -> NotFound:
    return NotFound(f"{data_request_name(data_request_id)} does not exist", reason="DATA_REQUEST_NOT_FOUND")


async def load_data_request(session: AsyncSession, data_request_id: str) -> tuple[DataRequestRow, str]:
    """The data request and its owner's display name, or NOT_FOUND."""
    found = (await session.execute(with_owner_name().where(DataRequestRow.id == data_request_id))).first()
    if found is None:
        raise data_request_not_found(data_request_id)
    return found[0], found[1]


async def load_data_requests(
    session: AsyncSession, data_request_ids: set[str]
) -> dict[str, data_request_pb2.DataRequest]:
    """The data requests of `data_request_ids` that exist, as messages, by id."""
    if not data_request_ids:
        return {}
    result = await session.execute(with_owner_name().where(DataRequestRow.id.in_(data_request_ids)))
    return {row.id: data_request_to_proto(row, owner_name) for row, owner_name in result.all()}


def ensure_owner(row: DataRequestRow, account_id: str, action: str) -> None:
    """PERMISSION_DENIED (NOT_OWNER) unless `account_id` owns the data request; `action` says what."""
    if row.owner_id != account_id:
        raise PermissionDenied(f"only the owner of a data request may {action}", reason="NOT_OWNER")


def ensure_owned_open(row: DataRequestRow, account_id: str, action: str) -> None:
    """`ensure_owner`, then FAILED_PRECONDITION (DATA_REQUEST_CLOSED) for a closed data request."""
    ensure_owner(row, account_id, action)
    if row.state == DataRequest.STATE_CLOSED:
        raise FailedPrecondition("the data request is closed", reason="DATA_REQUEST_CLOSED")
