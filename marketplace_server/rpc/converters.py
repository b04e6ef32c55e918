"""Database rows to protobuf messages (the only place that knows both)."""

from __future__ import annotations

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import access_pb2, data_request_pb2, identity_pb2, instance_pb2
from marketplace_server.clock import to_timestamp
from marketplace_server.db.models import AccountRow, DataRequestRow, InstanceRow, PermissionRow


def account_to_proto(row: AccountRow) -> identity_pb2.Account:
    return identity_pb2.Account(
        name=f"accounts/{row.id}",
        email=row.email,
        display_name=row.display_name,
        role=row.role,  # type: ignore[arg-type]
        create_time=to_timestamp(row.create_time),
    )


def instance_to_proto(row: InstanceRow, connected: bool) -> instance_pb2.Instance:
    return instance_pb2.Instance(
        name=f"instances/{row.instance_id}",
        instance_id=row.instance_id,
        address=row.address,
        owner=f"accounts/{row.owner_id}" if row.owner_id else "",
        state=instance_pb2.Instance.STATE_CLAIMED if row.owner_id else instance_pb2.Instance.STATE_REGISTERED,
        connected=connected,
        register_time=to_timestamp(row.register_time),
        claim_time=to_timestamp(row.claim_time),
        last_seen_time=to_timestamp(row.last_seen_time),
    )


def data_request_to_proto(row: DataRequestRow, owner_display_name: str) -> data_request_pb2.DataRequest:
    return data_request_pb2.DataRequest(
        name=f"dataRequests/{row.id}",
        kind=row.kind,  # type: ignore[arg-type]
        title=row.title,
        description=row.description,
        purpose=row.purpose,
        policy_uri=row.policy_uri,
        data_need=energy_pb2.DataNeed.FromString(row.data_need),
        owner=f"accounts/{row.owner_id}",
        owner_display_name=owner_display_name,
        state=row.state,  # type: ignore[arg-type]
        create_time=to_timestamp(row.create_time),
        close_time=to_timestamp(row.close_time),
    )


def permission_to_proto(row: PermissionRow) -> access_pb2.Permission:
    return access_pb2.Permission(
        name=f"permissions/{row.id}",
        data_request=f"dataRequests/{row.data_request_id}",
        instance_id=row.instance_id,
        eligible_party=f"accounts/{row.eligible_party_id}",
        customer=f"accounts/{row.customer_id}",
        state=row.state,  # type: ignore[arg-type]
        state_reason=row.state_reason,
        sink_uri=row.sink_uri,
        create_time=to_timestamp(row.create_time),
        decide_time=to_timestamp(row.decide_time),
        start_time=to_timestamp(row.start_time),
        end_time=to_timestamp(row.end_time),
        update_time=to_timestamp(row.update_time),
        decision_deadline=to_timestamp(row.decision_deadline),
    )
