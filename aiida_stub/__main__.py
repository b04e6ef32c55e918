"""`aiida-stub` / `python -m aiida_stub`: the reference AIIDA device (or a fleet of them)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aiida_stub.config import parse_config
from aiida_stub.profile import ProfileError
from aiida_stub.server import run
from aiida_stub.state import StateError
from eddie_common.logging import configure_logging
from eddie_common.serving import run_program


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    configure_logging(config.log_level)
    try:
        return run_program(run(config))  # type: ignore[no-any-return]
    except (ProfileError, StateError, OSError) as exc:
        print(f"aiida-stub: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
