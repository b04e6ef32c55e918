"""The `eddie` console script."""

from __future__ import annotations

import os
import sys

from eddie_cli import output
from eddie_cli.commands import cli
from eddie_cli.errors import EXIT_FAILED, CliError


def main() -> None:
    """Runs `eddie`; an unexpected failure is one line on stderr (EDDIE_DEBUG=1 shows the traceback)."""
    try:
        cli.main(prog_name="eddie", complete_var="_EDDIE_COMPLETE")
    except SystemExit:
        raise
    except CliError as error:  # raised while checking options, before a command runs
        output.error(error.message)
        sys.exit(error.exit_code)
    except Exception as error:
        if os.environ.get("EDDIE_DEBUG"):
            raise
        output.error(
            f"unexpected failure in eddie: {type(error).__name__}: {error} (EDDIE_DEBUG=1 shows more)"
        )
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
