"""Domain objects in words for people: data needs, data requests, permissions."""

from __future__ import annotations

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import access_pb2, data_request_pb2
from eddie_cli.output import enum_label, seconds, when

DATA_REQUESTS = "dataRequests/"
PERMISSIONS = "permissions/"
INSTANCES = "instances/"


def resource_name(collection: str, value: str) -> str:
    """`dataRequests/abc` from `abc` or `dataRequests/abc` (people paste either)."""
    return value if value.startswith(collection) else f"{collection}{value}"


def energy_type(need: energy_pb2.DataNeed) -> str:
    return enum_label(energy_pb2.EnergyType.Name(need.energy_type), "ENERGY_TYPE_")


def describe_need(need: energy_pb2.DataNeed) -> str:
    """`ELECTRICITY 1-0:1.8.0 every 1m to 15m, 0s of history, for 1d, regions AT`."""
    regions = ", ".join(need.regions) if need.regions else "any region"
    return (
        f"{energy_type(need)} {', '.join(need.data_tags)} every {seconds(need.min_granularity)} "
        f"to {seconds(need.max_granularity)}, {seconds(need.history)} of history, "
        f"for {seconds(need.duration)}, {regions}"
    )


def kind_label(request: data_request_pb2.DataRequest) -> str:
    return enum_label(data_request_pb2.DataRequest.Kind.Name(request.kind), "KIND_").replace("_", " ").lower()


def state_label(request: data_request_pb2.DataRequest) -> str:
    return enum_label(data_request_pb2.DataRequest.State.Name(request.state), "STATE_")


def data_request_fields(request: data_request_pb2.DataRequest) -> list[tuple[str, str]]:
    fields = [
        ("name", request.name),
        ("title", request.title),
        ("kind", kind_label(request)),
        ("state", state_label(request)),
        ("eligible party", f"{request.owner_display_name} ({request.owner})"),
        ("purpose", request.purpose),
        ("data asked", describe_need(request.data_need)),
        ("created (UTC)", when(request.create_time)),
    ]
    if request.description:
        fields.insert(3, ("description", request.description))
    if request.policy_uri:
        fields.append(("privacy policy", request.policy_uri))
    if request.state == data_request_pb2.DataRequest.STATE_CLOSED:
        fields.append(("closed (UTC)", when(request.close_time)))
    return fields


def permission_state(state: int) -> str:
    return enum_label(access_pb2.Permission.State.Name(state), "STATE_")  # type: ignore[arg-type]


def permission_row(permission: access_pb2.Permission) -> list[str]:
    reason = f" ({permission.state_reason})" if permission.state_reason else ""
    return [
        permission.name,
        permission.instance_id,
        permission_state(permission.state) + reason,
        permission.data_request,
        output_time(permission),
    ]


def output_time(permission: access_pb2.Permission) -> str:
    return when(permission.update_time if permission.update_time.seconds else permission.create_time)


PERMISSION_COLUMNS = ["permission", "instance", "state", "data request", "updated (UTC)"]
