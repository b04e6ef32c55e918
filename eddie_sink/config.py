"""Command-line flags (with `EDDIE_SINK_*` environment fallbacks) and the resulting config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eddie_common.cli import EnvArgumentParser, split_host_port
from eddie_common.mqtt import is_broker_uri

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class SinkConfig:
    """Everything the sink needs to start."""

    marketplace: str
    data_dir: Path
    listen: str = "127.0.0.1:0"
    jsonl: Path | None = None
    log_level: str = "info"
    grace_period: float = 5.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    marketplace_ca: Path | None = None
    mqtt_url: str | None = None  # mqtt://host:port of a broker to take AIIDA readings from
    # Not a flag: how long the broker keeps the sink's MQTT session (queueing its messages) while away.
    mqtt_session_expiry: int = 7 * 86400
    # Not a flag: how often an unknown `kid` may trigger a refetch of the keys.
    key_refresh_interval: float = 30.0

    @property
    def database_path(self) -> Path:
        return self.data_dir / "readings.db"


# fmt: off
def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="eddie-sink",
        description="Reference EDDIE Framework data sink: receives readings from AIIDAs "
        "(DataSinkService.Publish) and serves them to the eligible party (ListReadings).",
        env_prefix="EDDIE_SINK",
    )
    add = parser.add_flag
    add("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
        help="address to serve on; port 0 picks a free port")
    add("--marketplace", required=True, metavar="HOST:PORT",
        help="marketplace address; its signing keys are fetched with ListSigningKeys")
    add("--data-dir", type=Path, default=Path("var/eddie-sink"), metavar="DIR",
        help="directory of the SQLite database readings.db")
    add("--jsonl", type=Path, default=None, metavar="FILE",
        help="also append each newly stored reading to FILE as one JSON line")
    add("--log-level", default="info", choices=LOG_LEVELS, help="log level")
    add("--grace-period", type=float, default=5.0, metavar="SECONDS",
        help="how long in-flight RPCs may drain on shutdown")
    add("--tls-cert", type=Path, default=None, metavar="PEM",
        help="serve TLS with this certificate chain (needs --tls-key)")
    add("--tls-key", type=Path, default=None, metavar="PEM", help="private key of --tls-cert")
    add("--marketplace-ca", type=Path, default=None, metavar="PEM",
        help="dial the marketplace with TLS, trusting these CA certificates")
    add("--mqtt-url", default=None, metavar="URL",
        help="also take readings from this MQTT broker (mqtt://host:port or mqtts://host:port), "
        "on EDDIE's AIIDA topics aiida/v1/+/data/outbound/+")
    return parser
# fmt: on


def parse_config(argv: Sequence[str] | None = None) -> SinkConfig:
    """Parses flags (falling back to the environment); exits with usage on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--listen", args.listen), ("--marketplace", args.marketplace)):
        try:
            split_host_port(value)
        except ValueError as exc:
            parser.error(f"{flag}: {exc}")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.mqtt_url is not None and not is_broker_uri(args.mqtt_url):
        parser.error("--mqtt-url: expected mqtt://host:port or mqtts://host:port")
    if args.grace_period < 0:
        parser.error("--grace-period must not be negative")
    return SinkConfig(
        marketplace=args.marketplace,
        data_dir=args.data_dir,
        listen=args.listen,
        jsonl=args.jsonl,
        log_level=args.log_level,
        grace_period=args.grace_period,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        marketplace_ca=args.marketplace_ca,
        mqtt_url=args.mqtt_url,
    )
