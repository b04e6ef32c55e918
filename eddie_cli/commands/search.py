"""Workflow 5 for eligible parties: `eddie search NAME [--timeout SECONDS]`.

The marketplace streams the matches in batches as the AIIDAs answer, then one summary. Every
`matches` message carries the running count of answers against the instances queried (and
while no match arrives the marketplace sends a progress-only one now and then), so on a
terminal a live bar shows `answered / queried` as the answers come in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import click
import grpc
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from eddie.marketplace.v1 import data_request_pb2
from eddie_cli import output
from eddie_cli.app import Options, cli, common_options, run
from eddie_cli.connection import SignedIn, signed_in
from eddie_cli.describe import DATA_REQUESTS, resource_name
from eddie_cli.errors import from_rpc_error
from eddie_client import duration


class SearchProgress:
    """The live bar on stderr: answers against the instances queried, and the matches so far."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]searching[/]"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=output.stderr,
            disable=not enabled,
        )
        # No total until the first message says how many instances were queried: a pulsing bar.
        self.task = self.progress.add_task("search", total=None, status="waiting for answers")
        self.matched = 0

    def __enter__(self) -> SearchProgress:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def _show(self, answered: int, queried: int, more: str = "") -> None:
        if queried <= 0:  # a marketplace that sends no counts (or nothing claimed yet)
            self.progress.update(self.task, status=f"{self.matched} matched so far{more}")
            return
        self.progress.update(
            self.task,
            total=queried,
            completed=answered,
            status=f"{answered}/{queried} answered, {self.matched} matched{more}",
        )

    def update(self, matches: data_request_pb2.InstanceMatches) -> None:
        self.matched += len(matches.instance_ids)
        self._show(matches.answered, matches.queried)

    def finished(self, summary: data_request_pb2.SearchSummary) -> None:
        self.matched = summary.matched
        late = f", {summary.timed_out} timed out" if summary.timed_out else ""
        self._show(summary.queried - summary.timed_out, summary.queried, late)
        if summary.queried <= 0:
            self.progress.update(self.task, total=1, completed=1)


async def stream_search(
    me: SignedIn, request: data_request_pb2.SearchInstancesRequest
) -> AsyncIterator[data_request_pb2.SearchInstancesResponse]:
    """The search's messages; a failure becomes a CliError."""
    metadata = await me.fresh_metadata()
    call = me.connection.data_requests.SearchInstances(request, metadata=metadata)
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, me.connection.address) from None
    finally:
        call.cancel()


def summary_rows(summary: data_request_pb2.SearchSummary) -> list[tuple[str, str]]:
    return [
        ("search", summary.search),
        ("queried", str(summary.queried)),
        ("matched", str(summary.matched)),
        ("not matched", str(summary.not_matched)),
        ("unreachable", str(summary.unreachable)),
        ("timed out", str(summary.timed_out)),
        ("elapsed", f"{summary.elapsed.ToMilliseconds()} ms"),
    ]


def show_result(matches: list[str], summary: data_request_pb2.SearchSummary) -> None:
    if summary.withheld:
        output.say(
            f"[bold yellow]Withheld:[/] this search matched {summary.matched} instance(s), fewer than the "
            "marketplace's minimum match set, so no instance is named and none can be asked for access. "
            "Broaden the data request to reach more households."
        )
    else:
        output.print_table(
            f"Matches ({len(matches)})",
            ["instance"],
            ([instance_id] for instance_id in matches),
            empty="No AIIDA matched.",
        )
    output.print_fields(summary_rows(summary))


@cli.command()
@click.argument("name")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="seconds to wait for the AIIDAs' answers (default: the marketplace's, 3 s unless configured)",
)
@common_options
@click.pass_obj
def search(options: Options, name: str, timeout: float | None) -> None:
    """Search the AIIDAs that match data request NAME (eligible parties, own requests).

    Each AIIDA answers match or no match, nothing else. Shows a live progress bar on a
    terminal, then the matched instances and the summary. A search matching fewer households
    than the marketplace's minimum match set is withheld: it names no instance.
    """

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = data_request_pb2.SearchInstancesRequest(data_request=resource_name(DATA_REQUESTS, name))
            if timeout is not None:
                request.timeout.CopyFrom(duration(timeout))
            live = not options.json and output.stderr.is_terminal
            request.progress = live  # progress-only messages feed the bar while no match arrives
            matches: list[str] = []
            summary = data_request_pb2.SearchSummary()
            with SearchProgress(live) as progress:
                async for response in stream_search(me, request):
                    if response.HasField("matches"):
                        matches.extend(response.matches.instance_ids)
                        progress.update(response.matches)
                    elif response.HasField("summary"):
                        summary = response.summary
                        progress.finished(summary)
            if options.json:
                output.print_json(
                    data_request_pb2.Search(
                        name=summary.search, matched_instance_ids=matches, summary=summary
                    )
                )
            else:
                show_result(matches, summary)

    run(work())
