"""Workflow 1 for people: `eddie signup`, `login`, `logout`, `whoami`."""

from __future__ import annotations

import sys

import click

from eddie.marketplace.v1 import identity_pb2
from eddie_cli import output
from eddie_cli.app import Options, cli, common_options, run
from eddie_cli.connection import Connection, environment_password, signed_in
from eddie_cli.errors import EXIT_USAGE, CliError
from eddie_cli.session_store import StoredSession, delete_session, load_session, save_session

ROLES = {"customer": identity_pb2.ROLE_CUSTOMER, "eligible-party": identity_pb2.ROLE_ELIGIBLE_PARTY}


def read_password(confirm: bool) -> str:
    """EDDIE_PASSWORD, or asked on the terminal without echo."""
    from_environment = environment_password()
    if from_environment:
        return from_environment
    if not sys.stdin.isatty():
        raise CliError("no password: set EDDIE_PASSWORD or run eddie on a terminal", EXIT_USAGE)
    password: str = click.prompt("Password", hide_input=True, confirmation_prompt=confirm, err=True)
    return password


def role_label(role: identity_pb2.Role.ValueType) -> str:
    return next((label for label, value in ROLES.items() if value == role), "unknown")


def show_account(options: Options, account: identity_pb2.Account, marketplace: str, verb: str) -> None:
    if options.json:
        output.print_json(account)
        return
    output.say(f"{verb} [bold]{output.escape(account.display_name)}[/] <{output.escape(account.email)}>")
    output.print_fields(
        [
            ("account", account.name),
            ("role", role_label(account.role)),
            ("marketplace", marketplace),
        ]
    )


async def _sign_in(connection: Connection, email: str, password: str) -> StoredSession:
    token = await connection.call(
        connection.identity.CreateToken, identity_pb2.CreateTokenRequest(email=email, password=password)
    )
    stored = StoredSession.from_token(connection.address, token)
    save_session(stored)
    return stored


@cli.command()
@click.option("--email", required=True, help="the account's e-mail address (its login name)")
@click.option("--display-name", required=True, help="the name others see (EPs: your organisation)")
@click.option(
    "--role",
    required=True,
    type=click.Choice(list(ROLES)),
    help="customer (owns AIIDAs, decides on access) or eligible-party (asks for data)",
)
@common_options
@click.pass_obj
def signup(options: Options, email: str, display_name: str, role: str) -> None:
    """Create an account and sign in with it.

    The password is asked twice without echo on a terminal, or read from EDDIE_PASSWORD.
    """
    password = read_password(confirm=True)

    async def work() -> None:
        async with options.connect() as connection:
            request = identity_pb2.CreateAccountRequest(
                email=email, password=password, display_name=display_name, role=ROLES[role]
            )
            await connection.call(connection.identity.CreateAccount, request)
            stored = await _sign_in(connection, email, password)
            show_account(options, stored.account_proto, connection.address, "Signed up and signed in as")

    run(work())


@cli.command()
@click.option("--email", required=True, help="the account's e-mail address")
@common_options
@click.pass_obj
def login(options: Options, email: str) -> None:
    """Sign in and keep the session (tokens, marketplace address; never the password).

    The password is asked without echo on a terminal, or read from EDDIE_PASSWORD.
    """
    password = read_password(confirm=False)

    async def work() -> None:
        async with options.connect() as connection:
            stored = await _sign_in(connection, email, password)
            show_account(options, stored.account_proto, connection.address, "Signed in as")

    run(work())


@cli.command()
@common_options
@click.pass_obj
def logout(options: Options) -> None:
    """Forget the stored session."""
    stored = load_session()
    existed = delete_session()
    if options.json:
        output.print_json({"signedOut": existed, "marketplace": stored.marketplace if stored else ""})
    else:
        output.say("Signed out." if existed else "Not signed in.")


@cli.command()
@common_options
@click.pass_obj
def whoami(options: Options) -> None:
    """Show the signed-in account (asks the marketplace, so it also proves the session works)."""

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            account = await me.call(
                connection.identity.GetCurrentAccount, identity_pb2.GetCurrentAccountRequest()
            )
            show_account(options, account, connection.address, "Signed in as")

    run(work())
