"""Workflow 6 for customers: `eddie consent` (decide live) and `eddie permissions list|revoke`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import click
import grpc
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from eddie.marketplace.v1 import access_pb2, consent_pb2
from eddie_cli import output
from eddie_cli.app import Options, cli, common_options, run
from eddie_cli.commands.access import all_permissions, show_permissions
from eddie_cli.connection import SignedIn, signed_in
from eddie_cli.describe import PERMISSIONS, describe_need, permission_state, resource_name
from eddie_cli.errors import EXIT_USAGE, CliError, from_rpc_error

PENDING = access_pb2.Permission.STATE_PENDING
APPROVE, REJECT, SKIP = "approve", "reject", "skip"


@dataclass
class Policy:
    """How `eddie consent` decides: a fixed answer for scripts, or ask the person."""

    fixed: str | None
    reason: str
    pending_only: bool
    count: int | None


@dataclass
class ConsentSession:
    """What one `eddie consent` run has asked, decided and heard back."""

    policy: Policy
    options: Options
    outstanding: set[str] = field(default_factory=set)  # decided, answer not yet received
    answered: int = 0
    pending_at_start: int | None = None
    skipped: int = 0
    backlog: list[consent_pb2.AccessRequest] = field(default_factory=list)  # pending, before `ready`

    def decided(self) -> int:
        """Decisions sent: answered, or still waiting for their answer (skips are no decision)."""
        return self.answered + len(self.outstanding)

    def count_reached(self) -> bool:
        """--count N decisions are sent: decide nothing more (the rest stays pending)."""
        return self.policy.count is not None and self.decided() >= self.policy.count

    def done(self) -> bool:
        if self.outstanding:
            return False
        if self.count_reached():
            return True
        return (
            self.policy.pending_only
            and self.pending_at_start is not None
            and self.answered + self.skipped >= self.pending_at_start
        )


def access_request_card(request: consent_pb2.AccessRequest) -> Panel:
    """What a person needs to decide: who asks, why, which data, for how long."""
    data_request, permission = request.data_request, request.permission
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("from", data_request.owner_display_name),
        ("purpose", data_request.purpose),
        ("data asked", describe_need(data_request.data_need)),
        ("duration", output.seconds(data_request.data_need.duration)),
        ("instance", permission.instance_id),
        ("privacy policy", data_request.policy_uri or "-"),
        ("decide by (UTC)", output.when(permission.decision_deadline)),
    ]
    for label, value in rows:
        table.add_row(label, Text(value))  # what the EP wrote is data, never markup
    title = Text(data_request.title, style="bold")
    return Panel(table, title=title, subtitle=Text(permission.name), expand=False)


async def ask_person(request: consent_pb2.AccessRequest) -> str:
    output.stdout.print(access_request_card(request))
    return await prompt_in_daemon_thread("Share this data?", [APPROVE, REJECT, SKIP], SKIP)


async def prompt_in_daemon_thread(question: str, choices: list[str], default: str) -> str:
    """Asks on the terminal while the stream keeps running. A daemon thread (not the loop's
    executor, which asyncio.run would wait for) so Ctrl-C during the question exits at once."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()

    def deliver(outcome: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(lambda: None if answer.done() else outcome())

    def ask() -> None:
        try:
            text = click.prompt(question, type=click.Choice(choices), default=default, show_choices=True)
        except BaseException as error:  # Abort on end of input, among others
            deliver(functools.partial(answer.set_exception, error))
        else:
            deliver(lambda: answer.set_result(str(text)))

    threading.Thread(target=ask, name="consent-prompt", daemon=True).start()
    return await answer


async def on_access_request(
    call: grpc.aio.StreamStreamCall[consent_pb2.ConnectRequest, consent_pb2.ConnectResponse],
    session: ConsentSession,
    request: consent_pb2.AccessRequest,
) -> None:
    if session.count_reached():
        return  # --count N: N decisions are on their way; this one stays pending, not asked about
    choice = session.policy.fixed or await ask_person(request)
    name = request.permission.name
    if choice == SKIP:
        session.skipped += 1
        if not session.options.json:
            output.say(f"Skipped {output.escape(name)}; it stays pending.")
        return
    session.outstanding.add(name)
    decision = consent_pb2.Decision(permission=name, approve=choice == APPROVE, reason=session.policy.reason)
    await call.write(consent_pb2.ConnectRequest(decision=decision))


def on_answer(session: ConsentSession, message: consent_pb2.ConnectResponse) -> None:
    """A permission_update or decision_error that answers one of our decisions."""
    if session.options.json:
        output.print_json_line(message)
    elif message.HasField("decision_error"):
        e = message.decision_error
        output.error(f"{e.permission}: {e.reason}: {e.message}")
    else:
        p = message.permission_update
        who = output.escape(f"{p.name} ({p.instance_id})")
        output.say(f"{who} is now [bold]{permission_state(p.state)}[/].")


async def handle(
    call: grpc.aio.StreamStreamCall[consent_pb2.ConnectRequest, consent_pb2.ConnectResponse],
    session: ConsentSession,
    message: consent_pb2.ConnectResponse,
) -> None:
    kind = message.WhichOneof("event")
    if kind == "access_request" and session.pending_at_start is None:
        session.backlog.append(message.access_request)  # the pending ones come first, then `ready`
    elif kind == "access_request":
        await on_access_request(call, session, message.access_request)
    elif kind == "ready":
        await on_ready(call, session, message.ready.pending_count)
    elif kind == "decision_error" and message.decision_error.permission in session.outstanding:
        session.outstanding.discard(message.decision_error.permission)
        session.answered += 1
        on_answer(session, message)
    elif kind == "permission_update" and _answers(session, message.permission_update):
        session.outstanding.discard(message.permission_update.name)
        session.answered += 1
        on_answer(session, message)


async def on_ready(
    call: grpc.aio.StreamStreamCall[consent_pb2.ConnectRequest, consent_pb2.ConnectResponse],
    session: ConsentSession,
    pending_count: int,
) -> None:
    """Every pending request has arrived: ask about each, then wait for new ones."""
    session.pending_at_start = pending_count
    if not session.options.json:
        output.stderr.print(f"{pending_count} pending access request(s)")
    for pending in session.backlog:
        await on_access_request(call, session, pending)
    session.backlog.clear()
    if not session.options.json and not session.policy.pending_only and not session.count_reached():
        output.stderr.print("waiting for new access requests (Ctrl-C stops)")


def _answers(session: ConsentSession, permission: access_pb2.Permission) -> bool:
    """Whether this update is the outcome of one of our decisions (not a later state change)."""
    return permission.name in session.outstanding and permission.state != PENDING


async def run_consent(me: SignedIn, session: ConsentSession) -> None:
    call = me.connection.consent.Connect(metadata=await me.fresh_metadata())
    try:
        async for message in call:
            await handle(call, session, message)
            if session.done():
                return
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, me.connection.address) from None
    finally:
        call.cancel()


@cli.command()
@click.option("--approve-all", is_flag=True, help="approve every request without asking (scripts)")
@click.option("--reject-all", is_flag=True, help="reject every request without asking (scripts)")
@click.option("--reason", default="", help="reason sent with each decision (shown to the eligible party)")
@click.option(
    "--pending-only", is_flag=True, help="decide what is pending now, then exit instead of waiting live"
)
@click.option(
    "--count",
    type=click.IntRange(1),
    help="exit after this many decisions (pending requests first); the rest stay pending",
)
@common_options
@click.pass_obj
def consent(
    options: Options, approve_all: bool, reject_all: bool, reason: str, pending_only: bool, count: int | None
) -> None:
    """See who asks for your data, live, and approve or reject each request (customers).

    Shows every pending access request and each new one as it arrives: the title, the
    eligible party, the purpose, the data asked and for how long, then asks
    approve / reject / skip. Skipped requests stay pending. With --output json, each
    decision's result is printed as one JSON line.
    """
    if approve_all and reject_all:
        raise click.UsageError("--approve-all and --reject-all exclude each other")
    fixed = APPROVE if approve_all else REJECT if reject_all else None
    if fixed is None and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CliError(
            "eddie consent asks on a terminal; in scripts use --approve-all or --reject-all", EXIT_USAGE
        )
    policy = Policy(fixed, reason, pending_only, count)

    async def work() -> None:
        async with options.connect() as connection:
            await run_consent(signed_in(connection), ConsentSession(policy, options))

    run(work())


@cli.group()
def permissions() -> None:
    """The permissions on your AIIDAs (customers): list them, revoke one."""


@permissions.command("list")
@common_options
@click.pass_obj
def list_permissions(options: Options) -> None:
    """List the permissions granted on (or asked of) your AIIDAs, newest first."""

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            found = await all_permissions(me, access_pb2.ListPermissionsRequest())
            show_permissions(options, found, "Permissions on your AIIDAs")

    run(work())


@permissions.command("revoke")
@click.argument("permission")
@click.option(
    "--reason", default="revoked by the customer", show_default=True, help="why (shown to the eligible party)"
)
@common_options
@click.pass_obj
def revoke(options: Options, permission: str, reason: str) -> None:
    """Withdraw an accepted or active permission: the AIIDA stops sending.

    PERMISSION: permissions/ID or ID.
    """

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = consent_pb2.RevokePermissionRequest(
                name=resource_name(PERMISSIONS, permission), reason=reason
            )
            revoked = await me.call(connection.consent.RevokePermission, request)
            if options.json:
                output.print_json(revoked)
            else:
                output.say(
                    f"{output.escape(revoked.name)} is now [bold]{permission_state(revoked.state)}[/]."
                )

    run(work())
