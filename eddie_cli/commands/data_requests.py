"""Workflows 3 and 4: `eddie data-requests list|show|create|close`."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import click
from google.protobuf import json_format

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import data_request_pb2
from eddie_cli import output
from eddie_cli.app import Options, cli, common_options, run
from eddie_cli.connection import SignedIn, signed_in
from eddie_cli.describe import (
    DATA_REQUESTS,
    data_request_fields,
    energy_type,
    kind_label,
    resource_name,
    state_label,
)
from eddie_cli.errors import EXIT_USAGE, CliError

KINDS = {
    "data-request": data_request_pb2.DataRequest.KIND_DATA_REQUEST,
    "data-service": data_request_pb2.DataRequest.KIND_DATA_SERVICE,
}
ENERGY_TYPES = [name.removeprefix("ENERGY_TYPE_").lower() for name in energy_pb2.EnergyType.keys()[1:]]
PAGE_SIZE = 100


def read_data_request(path: Path) -> data_request_pb2.DataRequest:
    """A DataRequest from a protobuf JSON file ('-' reads stdin)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
        return json_format.Parse(text, data_request_pb2.DataRequest())
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}", EXIT_USAGE) from None
    except json_format.ParseError as error:
        raise CliError(f"{path} is not a DataRequest in protobuf JSON: {error}", EXIT_USAGE) from None


def show_one(options: Options, request: data_request_pb2.DataRequest, sentence: str = "") -> None:
    if options.json:
        output.print_json(request)
        return
    if sentence:
        output.say(sentence)
    output.print_fields(data_request_fields(request))


@cli.group("data-requests")
def data_requests() -> None:
    """Data requests and data services: browse them (everyone), publish and close them (eligible parties)."""


@data_requests.command("list")
@click.option("--region", help="only those asking for households in this region (e.g. AT-9)")
@click.option("--text", help="only those whose title, description or purpose contain TEXT")
@click.option("--kind", type=click.Choice(list(KINDS)), help="only data requests or only data services")
@click.option(
    "--energy-type", "energy", type=click.Choice(ENERGY_TYPES), help="only those asking for this energy type"
)
@click.option("--mine", is_flag=True, help="only your own (eligible parties)")
@click.option("--closed", is_flag=True, help="include closed ones")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="at most this many")
@common_options
@click.pass_obj
def list_data_requests(
    options: Options,
    region: str | None,
    text: str | None,
    kind: str | None,
    energy: str | None,
    mine: bool,
    closed: bool,
    limit: int,
) -> None:
    """Browse the data requests, newest first, with all given filters at once."""

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = data_request_pb2.ListDataRequestsRequest(
                region=region or "",
                text=text or "",
                kind=KINDS[kind] if kind else data_request_pb2.DataRequest.KIND_UNSPECIFIED,
                energy_type=energy_pb2.EnergyType.Value(f"ENERGY_TYPE_{energy.upper()}")
                if energy
                else energy_pb2.ENERGY_TYPE_UNSPECIFIED,
                owner=me.account.name if mine else "",
                show_closed=closed,
            )
            show_list(options, await first_pages(me, request, limit))

    run(work())


async def first_pages(
    me: SignedIn, request: data_request_pb2.ListDataRequestsRequest, limit: int
) -> data_request_pb2.ListDataRequestsResponse:
    """Up to `limit` data requests (as many pages as that takes) and the total."""
    found, last = await me.pages(
        me.connection.data_requests.ListDataRequests,
        request,
        lambda page: page.data_requests,
        page_size=PAGE_SIZE,
        limit=limit,
    )
    total = last.total_size if last is not None else 0
    return data_request_pb2.ListDataRequestsResponse(data_requests=found, total_size=total)


def show_list(options: Options, found: data_request_pb2.ListDataRequestsResponse) -> None:
    if options.json:
        output.print_json(found)
        return
    output.print_table(
        f"Data requests ({len(found.data_requests)} of {found.total_size})",
        ["name", "title", "kind", "eligible party", "energy", "state"],
        (
            [r.name, r.title, kind_label(r), r.owner_display_name, energy_type(r.data_need), state_label(r)]
            for r in found.data_requests
        ),
        empty="No data request matches.",
    )


@data_requests.command("show")
@click.argument("name")
@common_options
@click.pass_obj
def show(options: Options, name: str) -> None:
    """Show one data request (NAME: dataRequests/ID or just ID)."""

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = data_request_pb2.GetDataRequestRequest(name=resource_name(DATA_REQUESTS, name))
            show_one(options, await me.call(connection.data_requests.GetDataRequest, request))

    run(work())


@data_requests.command("create")
@click.option(
    "--file",
    "path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
    help="a DataRequest in protobuf JSON ('-' for stdin), e.g. examples/data_request.json",
)
@click.option(
    "--request-id", help="idempotency key: repeating it returns the first result (default: a new UUID)"
)
@common_options
@click.pass_obj
def create(options: Options, path: Path, request_id: str | None) -> None:
    """Publish a data request or data service (eligible parties)."""
    data_request = read_data_request(path)

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = data_request_pb2.CreateDataRequestRequest(
                data_request=data_request, request_id=request_id or str(uuid.uuid4())
            )
            created = await me.call(connection.data_requests.CreateDataRequest, request)
            show_one(options, created, f"Published [bold]{output.escape(created.name)}[/].")

    run(work())


@data_requests.command("close")
@click.argument("name")
@common_options
@click.pass_obj
def close(options: Options, name: str) -> None:
    """Close one of your data requests: it can no longer be searched (eligible parties)."""

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = data_request_pb2.CloseDataRequestRequest(name=resource_name(DATA_REQUESTS, name))
            closed = await me.call(connection.data_requests.CloseDataRequest, request)
            show_one(options, closed, f"Closed [bold]{output.escape(closed.name)}[/].")

    run(work())
