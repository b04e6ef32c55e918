"""`eddie-sink` / `python -m eddie_sink`: serve the reference data sink."""

from __future__ import annotations

import logging
import sys

from eddie_common.logging import configure_logging
from eddie_common.serving import run_program
from eddie_sink.config import parse_config
from eddie_sink.server import run


def main(argv: list[str] | None = None) -> int:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    configure_logging(config.log_level)
    # Their debug output is one line per SQL call / event-loop hook, not per event.
    for noisy in ("aiosqlite", "grpc._cython.cygrpc"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    try:
        run_program(run(config))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
