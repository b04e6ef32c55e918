"""`eddie-sink` / `python -m eddie_sink`: serve the reference data sink."""

from __future__ import annotations

import logging
import sys

from eddie_common.logging import configure_logging
from eddie_common.startup import UsageError, free_port, readable_file, run_main, writable_dir
from eddie_sink.config import PROGRAM, SinkConfig, parse_config
from eddie_sink.server import run


def preflight(config: SinkConfig) -> None:
    """Files readable, directories writable, the port free: nothing is created yet."""
    for flag, path in (
        ("--tls-cert", config.tls_cert),
        ("--tls-key", config.tls_key),
        ("--marketplace-ca", config.marketplace_ca),
    ):
        readable_file(flag, path)
    writable_dir("--data-dir", config.data_dir)
    if config.jsonl is not None:
        if config.jsonl.is_dir():
            raise UsageError(f"--jsonl {config.jsonl}: is a directory", "give a file name")
        writable_dir("--jsonl", config.jsonl.parent)
    free_port("--listen", config.listen, PROGRAM.prog)
    if config.metrics_listen is not None:
        free_port("--metrics-listen", config.metrics_listen, PROGRAM.prog)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    configure_logging(config.log_level)
    # Their debug output is one line per SQL call / event-loop hook, not per event.
    for noisy in ("aiosqlite", "grpc._cython.cygrpc"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))

    async def serve() -> None:
        await run(config)

    return run_main(PROGRAM.prog, config.log_level, lambda: preflight(config), serve)


if __name__ == "__main__":
    sys.exit(main())
