"""`eddie completion bash|zsh|fish`: the shell completion script (Click's own)."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

from eddie_cli.app import cli

SHELLS = ("bash", "zsh", "fish")


@cli.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    bash:  eval "$(eddie completion bash)"     (e.g. in ~/.bashrc)
    zsh:   eval "$(eddie completion zsh)"      (e.g. in ~/.zshrc)
    fish:  eddie completion fish > ~/.config/fish/completions/eddie.fish
    """
    completion_class = get_completion_class(shell)
    assert completion_class is not None  # every name in SHELLS is one of Click's
    root = ctx.find_root().command
    script = completion_class(root, {}, "eddie", "_EDDIE_COMPLETE").source()
    click.echo(script)
