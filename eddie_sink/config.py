"""Command-line flags (with `EDDIE_SINK_*` environment fallbacks) and the resulting config."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eddie_common.flags import (
    Program,
    file_flag,
    flag,
    grace_period_flag,
    host_port,
    log_level_flag,
    metrics_listen_flag,
    tls_problems,
)
from eddie_common.mqtt import check_broker_uri


@dataclass(frozen=True)
class SinkConfig:
    """Everything the sink needs to start."""

    marketplace: str = flag(
        "marketplace address; its signing keys are fetched with ListSigningKeys",
        metavar="HOST:PORT",
        check=host_port,
    )
    listen: str = flag(
        "address to serve on; port 0 picks a free port",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        check=host_port,
    )
    data_dir: Path = flag(
        "directory of the SQLite database readings.db", default=Path("var/eddie-sink"), metavar="DIR"
    )
    jsonl: Path | None = file_flag("also append each newly stored reading to FILE as one JSON line")
    log_level: str = log_level_flag()
    grace_period: float = grace_period_flag("how long in-flight RPCs may drain on shutdown", default=5.0)
    tls_cert: Path | None = file_flag(
        "serve TLS with this certificate chain (needs --tls-key)", metavar="PEM"
    )
    tls_key: Path | None = file_flag("private key of --tls-cert", metavar="PEM")
    marketplace_ca: Path | None = file_flag(
        "dial the marketplace with TLS, trusting these CA certificates", metavar="PEM"
    )
    mqtt_url: str | None = flag(
        "also take readings from this MQTT broker (mqtt://host:port or mqtts://host:port), "
        "on EDDIE's AIIDA topics aiida/v1/+/data/outbound/+",
        default=None,
        metavar="URL",
        check=check_broker_uri,
    )
    # Not a flag: how long the broker keeps the sink's MQTT session (queueing its messages) while away.
    mqtt_session_expiry: int = 7 * 86400
    metrics_listen: str | None = metrics_listen_flag()
    # Not a flag: how often an unknown `kid` may trigger a refetch of the keys.
    key_refresh_interval: float = 30.0

    @property
    def database_path(self) -> Path:
        return self.data_dir / "readings.db"

    def problems(self) -> list[str]:
        """What is wrong with the combination of options (each option is checked on its own first)."""
        return tls_problems(self.tls_cert, self.tls_key)


PROGRAM = Program(
    prog="eddie-sink",
    env_prefix="EDDIE_SINK",
    description="Reference EDDIE Framework data sink: receives readings from AIIDAs "
    "(DataSinkService.Publish) and serves them to the eligible party (ListReadings).",
    config=SinkConfig,
)


def build_parser() -> argparse.ArgumentParser:
    return PROGRAM.parser()


def parse_config(argv: Sequence[str] | None = None) -> SinkConfig:
    """Parses flags (falling back to the environment); exits 2 with one line on bad input."""
    return PROGRAM.parse(argv)
