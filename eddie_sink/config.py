"""Command-line flags (with `EDDIE_SINK_*` environment fallbacks) and the resulting config."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eddie_common.flags import LOG_LEVELS, Program, flag, host_port, non_negative
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
    jsonl: Path | None = flag(
        "also append each newly stored reading to FILE as one JSON line", default=None, metavar="FILE"
    )
    log_level: str = flag("log level", default="info", choices=LOG_LEVELS)
    grace_period: float = flag(
        "how long in-flight RPCs may drain on shutdown", default=5.0, metavar="SECONDS", check=non_negative
    )
    tls_cert: Path | None = flag(
        "serve TLS with this certificate chain (needs --tls-key)", default=None, metavar="PEM"
    )
    tls_key: Path | None = flag("private key of --tls-cert", default=None, metavar="PEM")
    marketplace_ca: Path | None = flag(
        "dial the marketplace with TLS, trusting these CA certificates", default=None, metavar="PEM"
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
    metrics_listen: str | None = flag(
        "HOST:PORT to serve Prometheus metrics on at /metrics (port 0 picks a free port; default: off)",
        default=None,
        metavar="HOST:PORT",
        check=host_port,
    )
    # Not a flag: how often an unknown `kid` may trigger a refetch of the keys.
    key_refresh_interval: float = 30.0

    @property
    def database_path(self) -> Path:
        return self.data_dir / "readings.db"

    def problems(self) -> list[str]:
        """What is wrong with the combination of options (each option is checked on its own first)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            return ["--tls-cert and --tls-key go together"]
        return []


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
