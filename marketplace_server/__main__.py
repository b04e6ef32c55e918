"""`marketplace-server` / `python -m marketplace_server`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from eddie_common.cli import split_host_port
from eddie_common.logging import configure_logging, log_event
from eddie_common.metrics import announce_metrics
from eddie_common.serving import announce
from eddie_common.startup import run_main
from marketplace_server.config import PROGRAM, Config, parse_config
from marketplace_server.startup import check_database, explain, preflight

log = logging.getLogger("marketplace_server")


async def serve(config: Config) -> None:
    # Imported here: the services take seconds to import, and bad input is reported before that.
    from eddie_common.collector import tune_collector
    from marketplace_server.server import create_server

    tune_collector()
    await check_database(config)
    host, _ = split_host_port(config.listen)
    app, port = await create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    if app.metrics is not None and app.metrics.endpoint.port is not None:
        announce_metrics(split_host_port(str(config.metrics_listen))[0], app.metrics.endpoint.port)
    announce(host, port)
    log_event(log, "serving", address=f"{host}:{port}", database=app.engine.dialect.name)
    await stop.wait()
    log_event(log, "shutting_down", grace_seconds=config.grace_period)
    await app.stop()
    log_event(log, "stopped")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    configure_logging(config.log_level)
    return run_main(
        PROGRAM.prog,
        config.log_level,
        preflight=lambda: preflight(config),
        serve=lambda: serve(config),
        translate=lambda exc: explain(exc, config),
    )


if __name__ == "__main__":
    sys.exit(main())
