"""`marketplace-server` / `python -m marketplace_server`."""

from __future__ import annotations

import asyncio
import logging
import sys

from eddie_common.cli import split_host_port
from eddie_common.logging import configure_logging, log_event
from eddie_common.serving import announce, run_program
from marketplace_server.config import parse_config
from marketplace_server.server import create_server

log = logging.getLogger("marketplace_server")


async def serve(argv: list[str] | None = None) -> None:
    import signal

    config = parse_config(argv)
    configure_logging(config.log_level)
    host, _ = split_host_port(config.listen)
    app, port = await create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    announce(host, port)
    log_event(log, "serving", address=f"{host}:{port}", database=app.engine.dialect.name)
    await stop.wait()
    log_event(log, "shutting_down", grace_seconds=config.grace_period)
    await app.stop()
    log_event(log, "stopped")


def main(argv: list[str] | None = None) -> None:
    try:
        run_program(serve(argv))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"marketplace-server: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
