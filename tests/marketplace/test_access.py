"""Workflow 6, eligible party side, through a real server and a real AIIDA double."""

from __future__ import annotations

import time
from typing import Any

import grpc

from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import access_pb2, data_request_pb2
from eddie_common.interceptors import error_info
from tests.support.access import (
    SINK_URI,
    Permission,
    Scene,
    aiida,
    market,
    matched_scene,
    new_scene,
    read_until,
)
from tests.support.aiida_double import RunningAiida
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

__all__ = ["aiida", "market"]  # fixtures

DataAccess = aiida_pb2.DataAccess


def request(scene: Scene, *instance_ids: str, **fields: Any) -> access_pb2.RequestAccessRequest:
    values: dict[str, Any] = {
        "data_request": scene.data_request.name,
        "instance_ids": list(instance_ids),
        "sink_uri": SINK_URI,
    }
    values.update(fields)
    return access_pb2.RequestAccessRequest(**values)


async def list_permissions(client: Any, **fields: Any) -> access_pb2.ListPermissionsResponse:
    return await client.access.ListPermissions(
        access_pb2.ListPermissionsRequest(**fields), metadata=client.metadata
    )


async def test_request_access_creates_one_pending_permission_per_matched_instance(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=2)
    before = time.time()
    permissions = await scene.request_access(*ids)
    assert [p.instance_id for p in permissions] == ids
    for permission, instance_id in zip(permissions, ids, strict=True):
        assert permission.name.startswith("permissions/")
        assert permission.state == Permission.STATE_PENDING
        assert permission.data_request == scene.data_request.name
        assert permission.eligible_party == scene.ep.account.name
        assert permission.customer == scene.customers[instance_id].account.name
        assert permission.sink_uri == SINK_URI
        deadline = permission.decision_deadline.ToSeconds() - before
        assert market.app.config.decision_timeout - 5 < deadline < market.app.config.decision_timeout + 5
        assert not permission.HasField("decide_time")
        assert await scene.get(permission) == permission
        assert await scene.get(permission, scene.customers[instance_id]) == permission
    customer_view = await list_permissions(scene.customers[ids[0]])
    assert [p.name for p in customer_view.permissions] == [permissions[0].name]


async def test_request_access_for_an_unmatched_instance_creates_nothing(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=1, unmatched=1)
    matched, unmatched = ids
    never_seen = "aiida-never-registered"
    for instance_ids in ([matched, unmatched], [never_seen], [unmatched, matched]):
        err = await expect_error(
            scene.ep.access.RequestAccess(request(scene, *instance_ids), metadata=scene.ep.metadata),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INSTANCE_NOT_MATCHED",
        )
        info = error_info(err)
        assert info is not None
        assert info.metadata["instance_id"] in (unmatched, never_seen)
    assert list((await list_permissions(scene.ep)).permissions) == []
    assert list((await list_permissions(scene.customers[matched])).permissions) == []


async def test_request_access_checks_every_field(market: RunningMarketplace, aiida: RunningAiida) -> None:
    scene, ids = await matched_scene(market, aiida)
    call = scene.ep.access.RequestAccess
    cases = [
        (request(scene, *ids, sink_uri="http://sink:80"), "sink_uri"),
        (request(scene, *ids, sink_uri="grpc://sink"), "sink_uri"),
        (request(scene, *ids, sink_uri=""), "sink_uri"),
        (request(scene), "instance_ids"),
        (request(scene, *[f"a{i:04d}" for i in range(1001)]), "instance_ids"),
        (request(scene, ids[0], ids[0]), "instance_ids[1]"),
        (request(scene, "bad id!"), "instance_ids[0]"),
        (request(scene, *ids, data_request="requests/1"), "data_request"),
        (request(scene, *ids, request_id="not a valid id"), "request_id"),
    ]
    for bad, field in cases:
        await expect_error(
            call(bad, metadata=scene.ep.metadata), grpc.StatusCode.INVALID_ARGUMENT, field=field
        )
    await expect_error(
        call(request(scene, *ids, data_request="dataRequests/nope"), metadata=scene.ep.metadata),
        grpc.StatusCode.NOT_FOUND,
        "DATA_REQUEST_NOT_FOUND",
    )
    other_ep = await market.eligible_party()
    await expect_error(
        call(request(scene, *ids), metadata=other_ep.metadata), grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER"
    )
    customer = scene.customers[ids[0]]
    await expect_error(
        call(request(scene, *ids), metadata=customer.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    await scene.ep.data_requests.CloseDataRequest(
        data_request_pb2.CloseDataRequestRequest(name=scene.data_request.name), metadata=scene.ep.metadata
    )
    await expect_error(
        call(request(scene, *ids), metadata=scene.ep.metadata),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DATA_REQUEST_CLOSED",
    )


async def test_a_repeated_request_id_returns_the_first_result(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=2)
    first = await scene.request_access(*ids, request_id="req-1")
    again = await scene.request_access(*ids, request_id="req-1")
    assert [p.name for p in again] == [p.name for p in first]
    assert len((await list_permissions(scene.ep)).permissions) == 2
    await expect_error(
        scene.ep.access.RequestAccess(request(scene, ids[0], request_id="req-1"), metadata=scene.ep.metadata),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    # Another request id for the same instances: they still have their live (pending) permissions,
    # which come back instead of second ones (API.md, RequestAccess).
    other = await scene.request_access(*ids, request_id="req-2")
    assert [p.name for p in other] == [p.name for p in first]
    assert len((await list_permissions(scene.ep)).permissions) == 2


async def test_permissions_are_visible_only_to_their_eligible_party_and_customer(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida)
    [permission] = await scene.request_access(*ids)
    stranger_ep, stranger_customer = await market.eligible_party(), await market.customer()
    for stranger in (stranger_ep, stranger_customer):
        await expect_error(scene.get(permission, stranger), grpc.StatusCode.NOT_FOUND, "PERMISSION_NOT_FOUND")
        assert list((await list_permissions(stranger)).permissions) == []
    await expect_error(
        scene.get(Permission(name="permissions/does-not-exist")),
        grpc.StatusCode.NOT_FOUND,
        "PERMISSION_NOT_FOUND",
    )
    await expect_error(scene.get(Permission(name="perm/1")), grpc.StatusCode.INVALID_ARGUMENT, field="name")


async def test_list_permissions_pages_newest_first_and_filters(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=3)
    created = [(await scene.request_access(i))[0] for i in ids]
    await scene.decide(created[0], approve=False)
    names: list[str] = []
    token = ""
    while True:
        page = await list_permissions(scene.ep, page_size=2, page_token=token)
        assert len(page.permissions) <= 2
        names += [p.name for p in page.permissions]
        token = page.next_page_token
        if not token:
            break
    assert names == [p.name for p in reversed(created)]
    rejected = await list_permissions(scene.ep, state=Permission.STATE_REJECTED)
    assert [p.name for p in rejected.permissions] == [created[0].name]
    by_request = await list_permissions(scene.ep, data_request=scene.data_request.name)
    assert len(by_request.permissions) == 3
    first = await list_permissions(scene.ep, page_size=1)
    await expect_error(
        list_permissions(
            scene.ep, page_size=1, page_token=first.next_page_token, state=Permission.STATE_PENDING
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_watch_permissions_follows_pending_accepted_active_and_rejected(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=2)
    watch = scene.ep.access.WatchPermissions(
        access_pb2.WatchPermissionsRequest(data_request=scene.data_request.name), metadata=scene.ep.metadata
    )
    try:
        approved, rejected = await scene.request_access(*ids)
        await scene.decide(approved, approve=True)
        await scene.decide(rejected, approve=False, reason="not now")
        await scene.double.until(lambda: bool(scene.double.configured(ids[0])))
        await scene.double.push_status(
            ids[0], approved.name.removeprefix("permissions/"), DataAccess.STATE_ACTIVE
        )
        wanted = {(approved.name, Permission.STATE_ACTIVE), (rejected.name, Permission.STATE_REJECTED)}
        seen: set[tuple[str, int]] = set()

        def all_seen(event: Any) -> bool:
            seen.add((event.permission.name, event.permission.state))
            return wanted <= seen

        events = await read_until(watch, all_seen)
    finally:
        watch.cancel()
    steps = {
        name: [(e.previous_state, e.permission.state) for e in events if e.permission.name == name]
        for name in (approved.name, rejected.name)
    }
    assert steps[approved.name] == [
        (Permission.STATE_UNSPECIFIED, Permission.STATE_PENDING),
        (Permission.STATE_PENDING, Permission.STATE_ACCEPTED),
        (Permission.STATE_ACCEPTED, Permission.STATE_ACTIVE),
    ]
    assert steps[rejected.name] == [
        (Permission.STATE_UNSPECIFIED, Permission.STATE_PENDING),
        (Permission.STATE_PENDING, Permission.STATE_REJECTED),
    ]
    # A watch opened now starts with the current state of each.
    later = scene.ep.access.WatchPermissions(access_pb2.WatchPermissionsRequest(), metadata=scene.ep.metadata)
    try:
        snapshot = [await later.read(), await later.read()]
    finally:
        later.cancel()
    assert {(e.permission.name, e.permission.state, e.previous_state) for e in snapshot} == {
        (approved.name, Permission.STATE_ACTIVE, Permission.STATE_UNSPECIFIED),
        (rejected.name, Permission.STATE_REJECTED, Permission.STATE_UNSPECIFIED),
    }
    [rejected_now] = [e.permission for e in snapshot if e.permission.name == rejected.name]
    assert rejected_now.state_reason == "not now"


async def test_watch_permissions_is_for_the_owner_of_the_data_request(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    other_ep, customer = await market.eligible_party(), await market.customer()
    for client, code, reason in [
        (other_ep, grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER"),
        (customer, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"),
    ]:
        call = client.access.WatchPermissions(
            access_pb2.WatchPermissionsRequest(data_request=scene.data_request.name), metadata=client.metadata
        )
        await expect_error(call.read(), code, reason)


async def test_the_eligible_party_terminates_a_permission(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=2)
    active, pending = await scene.request_access(*ids)
    scene.double.configure_state = DataAccess.STATE_ACTIVE
    await scene.decide(active, approve=True)
    await scene.until_state(active, Permission.STATE_ACTIVE)
    terminate = scene.ep.access.TerminatePermission
    await expect_error(
        terminate(access_pb2.TerminatePermissionRequest(name=active.name), metadata=scene.ep.metadata),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="reason",
    )
    customer = scene.customers[ids[0]]
    await expect_error(
        terminate(
            access_pb2.TerminatePermissionRequest(name=active.name, reason="x"), metadata=customer.metadata
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    ended = await terminate(
        access_pb2.TerminatePermissionRequest(name=active.name, reason="study finished"),
        metadata=scene.ep.metadata,
    )
    assert ended.state == Permission.STATE_TERMINATED
    assert ended.state_reason == "study finished"
    await scene.double.until(lambda: len(scene.double.revokes) == 1)
    assert scene.double.revokes[0].request.permission_id == active.name.removeprefix("permissions/")
    assert scene.double.revokes[0].request.reason == "study finished"
    withdrawn = await terminate(
        access_pb2.TerminatePermissionRequest(name=pending.name, reason="no longer needed"),
        metadata=scene.ep.metadata,
    )
    assert withdrawn.state == Permission.STATE_TERMINATED
    for name in (active.name, pending.name):
        await expect_error(
            terminate(
                access_pb2.TerminatePermissionRequest(name=name, reason="again"), metadata=scene.ep.metadata
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "PERMISSION_NOT_ACTIVE",
        )
    assert len(scene.double.revokes) == 1  # the withdrawn request never reached the AIIDA


async def test_aiida_statuses_move_permissions_and_invalid_ones_are_ignored(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=3)
    permissions = [(await scene.request_access(i))[0] for i in ids]
    for permission in permissions:
        await scene.decide(permission, approve=True)
    await scene.double.until(lambda: all(scene.double.configured(i) for i in ids))
    reports = [
        (DataAccess.STATE_UNFULFILLABLE, "no heat meter", Permission.STATE_UNFULFILLABLE, "no heat meter"),
        (
            DataAccess.STATE_FAILED,
            "sink refused the token",
            Permission.STATE_UNFULFILLABLE,
            "sink refused the token",
        ),
        (DataAccess.STATE_FULFILLED, "window over", Permission.STATE_FULFILLED, "the data window ended"),
    ]
    for (state, reason, expected, expected_reason), permission in zip(reports, permissions, strict=True):
        await scene.double.push_status(
            permission.instance_id, permission.name.removeprefix("permissions/"), state, reason
        )
        ended = await scene.until_state(permission, expected)
        assert ended.state_reason == expected_reason
    # Re-reports after the end (as after a reconnect) change nothing.
    await scene.double.push_status(
        ids[2], permissions[2].name.removeprefix("permissions/"), DataAccess.STATE_REVOKED, "x"
    )
    await market.app.statuses.join()
    assert (await scene.get(permissions[2])).state == Permission.STATE_FULFILLED


async def test_a_hostile_aiida_cannot_change_another_instances_permission(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, ids = await matched_scene(market, aiida, instances=2)
    victim_instance, hostile_instance = ids
    victim, own = [(await scene.request_access(i))[0] for i in ids]
    await scene.decide(victim, approve=True)
    await scene.decide(own, approve=True)
    victim_id = victim.name.removeprefix("permissions/")
    await scene.double.push_status(hostile_instance, victim_id, DataAccess.STATE_REVOKED, "mine now")
    await scene.double.push_status(hostile_instance, "unknown-permission", DataAccess.STATE_ACTIVE)
    await scene.double.push_status(
        hostile_instance, own.name.removeprefix("permissions/"), DataAccess.STATE_ACTIVE
    )
    await scene.until_state(own, Permission.STATE_ACTIVE)  # the stream's messages have all arrived
    await market.app.statuses.join()
    assert (await scene.get(victim)).state == Permission.STATE_ACCEPTED
    await scene.double.push_status(victim_instance, victim_id, DataAccess.STATE_ACTIVE)
    await scene.until_state(victim, Permission.STATE_ACTIVE)
