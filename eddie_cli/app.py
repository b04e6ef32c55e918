"""The `eddie` command group, its global options and the runner every command goes through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from eddie_cli import output
from eddie_cli.connection import Connection, resolve_target
from eddie_cli.errors import EXIT_INTERRUPTED, CliError

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@dataclass
class Options:
    """The global options, settable before or after the command name."""

    marketplace: str | None = None
    output: str = output.TABLE
    tls_ca: Path | None = None

    @property
    def json(self) -> bool:
        return self.output == output.JSON

    def connect(self) -> Connection:
        return Connection(resolve_target(self.marketplace, self.tls_ca))


def _set_option(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None:
            setattr(ctx.ensure_object(Options), name, value)

    return callback


MARKETPLACE_HELP = (
    "marketplace HOST:PORT (env EDDIE_MARKETPLACE; default: the signed-in session's, else 127.0.0.1:50051)"
)
OUTPUT_HELP = (
    "`table` for people (default) or `json`: one protobuf-JSON document for scripts (env EDDIE_OUTPUT)"
)


def common_options(command: F) -> F:
    """--output and --marketplace after the command name too (`eddie instances list --output json`)."""
    command = click.option(
        "--output",
        "-o",
        type=click.Choice(output.OUTPUT_FORMATS),
        default=None,
        expose_value=False,
        callback=_set_option("output"),
        help=OUTPUT_HELP,
    )(command)
    command = click.option(
        "--marketplace",
        default=None,
        metavar="HOST:PORT",
        expose_value=False,
        callback=_set_option("marketplace"),
        help=MARKETPLACE_HELP,
    )(command)
    return command


def run(work: Coroutine[Any, Any, int | None]) -> None:
    """Runs a command's coroutine; errors become one line on stderr and an exit status."""
    try:
        status = asyncio.run(work)
    except CliError as error:
        output.error(error.message)
        raise SystemExit(error.exit_code) from None
    except (KeyboardInterrupt, click.exceptions.Abort):
        output.stderr.print("interrupted")
        raise SystemExit(EXIT_INTERRUPTED) from None
    if status:
        raise SystemExit(status)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--marketplace",
    envvar="EDDIE_MARKETPLACE",
    default=None,
    metavar="HOST:PORT",
    expose_value=False,
    callback=_set_option("marketplace"),
    help=MARKETPLACE_HELP,
)
@click.option(
    "--output",
    "-o",
    envvar="EDDIE_OUTPUT",
    type=click.Choice(output.OUTPUT_FORMATS),
    default=None,
    expose_value=False,
    callback=_set_option("output"),
    help=OUTPUT_HELP,
)
@click.option(
    "--tls-ca",
    envvar="EDDIE_TLS_CA",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    expose_value=False,
    callback=_set_option("tls_ca"),
    help="PEM CA bundle: talk TLS to the marketplace (env EDDIE_TLS_CA; default: plaintext)",
)
@click.version_option(package_name="eddie-marketplace", prog_name="eddie")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """eddie: the EDDIE energy-data marketplace from the command line.

    Customers claim their AIIDA, see who asks for their data and approve or reject it;
    eligible parties publish data requests, search for matching households and ask for
    access. Sign in first (`eddie signup` or `eddie login`); the session is kept in
    $XDG_CONFIG_HOME/eddie/ (mode 0600) and refreshed by itself.

    Shell completion: `eval "$(eddie completion bash)"` (or zsh, fish).
    """
    ctx.ensure_object(Options)
