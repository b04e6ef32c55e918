"""Workflow 6 for eligible parties: `eddie access request|list|watch|terminate`."""

from __future__ import annotations

import uuid

import click
import grpc

from eddie.marketplace.v1 import access_pb2
from eddie_cli import output
from eddie_cli.app import Options, cli, common_options, run
from eddie_cli.connection import SignedIn, signed_in
from eddie_cli.describe import (
    DATA_REQUESTS,
    PERMISSION_COLUMNS,
    PERMISSIONS,
    permission_row,
    permission_state,
    resource_name,
)
from eddie_cli.errors import from_rpc_error

STATE = access_pb2.Permission.State
STATES = [name.removeprefix("STATE_").lower() for name in STATE.keys()[1:]]
PAGE_SIZE = 500


def show_permissions(options: Options, permissions: list[access_pb2.Permission], title: str) -> None:
    if options.json:
        output.print_json(access_pb2.ListPermissionsResponse(permissions=permissions))
        return
    output.print_table(
        title, PERMISSION_COLUMNS, (permission_row(p) for p in permissions), empty="No permission."
    )


async def all_permissions(
    me: SignedIn, request: access_pb2.ListPermissionsRequest
) -> list[access_pb2.Permission]:
    method = me.connection.access.ListPermissions
    found, _ = await me.pages(method, request, lambda page: page.permissions, page_size=PAGE_SIZE)
    return found


@cli.group()
def access() -> None:
    """Ask AIIDA owners for access to their data and follow the answers (eligible parties)."""


@access.command("request")
@click.argument("name")
@click.option(
    "--instance",
    "instance_ids",
    multiple=True,
    required=True,
    metavar="ID",
    help="a matched instance to ask (repeat for several: --instance a --instance b)",
)
@click.option(
    "--sink-uri", required=True, help="where the AIIDAs send the data: grpc://HOST:PORT of your eddie-sink"
)
@click.option(
    "--request-id", help="idempotency key: repeating it returns the first result (default: a new UUID)"
)
@common_options
@click.pass_obj
def request_access(
    options: Options, name: str, instance_ids: tuple[str, ...], sink_uri: str, request_id: str | None
) -> None:
    """Ask the owners of matched instances for access under data request NAME.

    Each instance gets one PENDING permission; its owner approves or rejects it.
    """

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = access_pb2.RequestAccessRequest(
                data_request=resource_name(DATA_REQUESTS, name),
                instance_ids=list(instance_ids),
                sink_uri=sink_uri,
                request_id=request_id or str(uuid.uuid4()),
            )
            response = await me.call(connection.access.RequestAccess, request)
            if options.json:
                output.print_json(response)
                return
            show_permissions(options, list(response.permissions), "Access requested")

    run(work())


@access.command("list")
@click.argument("name", required=False)
@click.option("--state", type=click.Choice(STATES), help="only permissions in this state")
@common_options
@click.pass_obj
def list_access(options: Options, name: str | None, state: str | None) -> None:
    """List your permissions, all or those of data request NAME."""

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = access_pb2.ListPermissionsRequest(
                data_request=resource_name(DATA_REQUESTS, name) if name else "",
                state=STATE.Value(f"STATE_{state.upper()}") if state else STATE.STATE_UNSPECIFIED,
            )
            show_permissions(options, await all_permissions(me, request), "Permissions")

    run(work())


@access.command("watch")
@click.argument("name", required=False)
@click.option(
    "--count", type=click.IntRange(1), help="stop after this many events (default: follow until Ctrl-C)"
)
@common_options
@click.pass_obj
def watch(options: Options, name: str | None, count: int | None) -> None:
    """Follow the permission events of data request NAME (or of all your requests) live.

    With --output json, one PermissionEvent per line (JSON Lines).
    """

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = access_pb2.WatchPermissionsRequest(
                data_request=resource_name(DATA_REQUESTS, name) if name else ""
            )
            await follow(me, request, options, count)

    run(work())


async def follow(
    me: SignedIn, request: access_pb2.WatchPermissionsRequest, options: Options, count: int | None
) -> None:
    call = me.connection.access.WatchPermissions(request, metadata=await me.fresh_metadata())
    if not options.json:
        output.stderr.print("watching permission events (Ctrl-C stops)")
    seen = 0
    try:
        async for event in call:
            show_event(options, event)
            seen += 1
            if count is not None and seen >= count:
                return
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, me.connection.address) from None
    finally:
        call.cancel()


def show_event(options: Options, event: access_pb2.PermissionEvent) -> None:
    if options.json:
        output.print_json_line(event)
        return
    p = event.permission
    reason = output.escape(f" ({p.state_reason})") if p.state_reason else ""
    # The opening events carry the current state and no previous one: no transition to show.
    moved = f"{permission_state(event.previous_state)} -> " if event.previous_state else ""
    output.say(
        f"{output.when(p.update_time)}  {output.escape(p.instance_id)}  {moved}"
        f"[bold]{permission_state(p.state)}[/]{reason}  {output.escape(p.name)}"
    )


@access.command("terminate")
@click.argument("permission")
@click.option(
    "--reason", default="terminated by the eligible party", show_default=True, help="why, for the owner"
)
@common_options
@click.pass_obj
def terminate(options: Options, permission: str, reason: str) -> None:
    """End one of your accepted or active permissions (PERMISSION: permissions/ID or ID)."""

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = access_pb2.TerminatePermissionRequest(
                name=resource_name(PERMISSIONS, permission), reason=reason
            )
            ended = await me.call(connection.access.TerminatePermission, request)
            if options.json:
                output.print_json(ended)
            else:
                output.say(f"{output.escape(ended.name)} is now [bold]{permission_state(ended.state)}[/].")

    run(work())
