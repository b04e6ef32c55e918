"""Command-line flags (with `AIIDA_*` environment fallbacks) and the resulting config."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eddie_common.cli import EnvArgumentParser, split_host_port

LOG_LEVELS = ("debug", "info", "warning", "error")
INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,63}")
PAIRING_CODE = re.compile(r"[A-Za-z0-9-]{6,64}")
MAX_FLEET = 100_000


@dataclass(frozen=True)
class Config:
    """Everything `create_server` needs; tests build one directly."""

    marketplace: str
    listen: str = "127.0.0.1:0"
    advertise: str | None = None  # default: the listen host and the bound port
    state_dir: Path = Path("var/aiida")
    profiles: tuple[Path, ...] = ()  # default: a shipped example (all of them for a fleet)
    instance_id: str | None = None
    pairing_code: str | None = None
    time_scale: float = 1.0
    fleet: int = 0  # 0: one instance; N: the fleet simulator
    id_prefix: str = "aiida-fleet"
    log_level: str = "info"
    grace_period: float = 5.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: only clients with a certificate it signed (mutual TLS)
    marketplace_ca: Path | None = None
    sink_ca: Path | None = None
    registration_concurrency: int = 64
    # Not flags: retry pacing of registration and of sink connections (tests shorten them).
    retry_initial_delay: float = 0.2
    retry_max_delay: float = 5.0


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="aiida-stub",
        env_prefix="AIIDA",
        description="Reference AIIDA device: registers at the marketplace, answers search queries from a "
        "local household profile, and streams simulated meter readings to eligible parties' sinks. "
        "With --fleet N it hosts N instances behind one port.",
    )
    defaults = Config(marketplace="")
    _add_network_flags(parser, defaults)
    _add_device_flags(parser, defaults)
    _add_fleet_and_process_flags(parser, defaults)
    return parser


def _add_network_flags(p: EnvArgumentParser, d: Config) -> None:
    p.add_flag(
        "--listen",
        default=d.listen,
        metavar="HOST:PORT",
        help="address to serve eddie.aiida.v1.AiidaService on; port 0 picks a free port",
    )
    p.add_flag(
        "--advertise",
        default=None,
        metavar="HOST:PORT",
        help="address the marketplace dials (sent with RegisterInstance); "
        "default: the listen host and the bound port",
    )
    p.add_flag("--marketplace", required=True, metavar="HOST:PORT", help="marketplace to register at")
    p.add_flag(
        "--tls-cert", type=Path, default=None, metavar="FILE", help="PEM certificate to serve TLS with"
    )
    p.add_flag("--tls-key", type=Path, default=None, metavar="FILE", help="PEM private key of --tls-cert")
    p.add_flag(
        "--tls-client-ca",
        type=Path,
        default=None,
        metavar="FILE",
        help="PEM CA bundle; when set, callers (the marketplace) must present a certificate it signed "
        "(mutual TLS; needs --tls-cert)",
    )
    p.add_flag(
        "--marketplace-ca",
        type=Path,
        default=None,
        metavar="FILE",
        help="PEM CA to dial the marketplace over TLS with (default: plaintext)",
    )
    p.add_flag(
        "--sink-ca",
        type=Path,
        default=None,
        metavar="FILE",
        help="PEM CA for grpcs:// sinks (default: the system roots)",
    )


def _add_device_flags(p: EnvArgumentParser, d: Config) -> None:
    p.add_flag(
        "--state-dir",
        type=Path,
        default=d.state_dir,
        metavar="DIR",
        help="directory of the persistent state (instance ids, secrets, pairing codes, data accesses)",
    )
    p.add_flag(
        "--profile",
        action="append",
        default=None,
        metavar="FILE",
        help="household profile (TOML); repeatable, or a directory of *.toml profiles; one instance "
        "uses the first, a fleet takes them round-robin (default: the shipped vienna-p1.toml, "
        "or every shipped profile for a fleet)",
    )
    p.add_flag(
        "--instance-id",
        default=None,
        metavar="ID",
        help="this instance's id (default: a generated aiida-<hex>, kept in the state dir)",
    )
    p.add_flag(
        "--pairing-code",
        default=None,
        metavar="CODE",
        help="the code the owner enters to claim the device (6-64 of [A-Za-z0-9-]); "
        "default: generated once and kept in the state dir; printed at start-up",
    )
    p.add_flag(
        "--time-scale",
        type=float,
        default=d.time_scale,
        metavar="X",
        help="run the simulated meter X times faster than the clock (60: a simulated minute per second)",
    )


def _add_fleet_and_process_flags(p: EnvArgumentParser, d: Config) -> None:
    p.add_flag(
        "--fleet",
        type=int,
        default=d.fleet,
        metavar="N",
        help="fleet simulator: host N instances <prefix>-0 .. <prefix>-(N-1) behind --listen (0: off)",
    )
    p.add_flag("--id-prefix", default=d.id_prefix, metavar="P", help="instance id prefix of the fleet")
    p.add_flag(
        "--registration-concurrency",
        type=int,
        default=d.registration_concurrency,
        metavar="N",
        help="registrations in flight at once (fleet)",
    )
    p.add_flag("--log-level", default=d.log_level, choices=LOG_LEVELS, help="log level")
    p.add_flag(
        "--grace-period",
        type=float,
        default=d.grace_period,
        metavar="SECONDS",
        help="how long in-flight calls may finish on SIGINT/SIGTERM",
    )


def _check(config: Config) -> list[str]:
    problems: list[str] = []
    for flag, value in (
        ("--listen", config.listen),
        ("--marketplace", config.marketplace),
        ("--advertise", config.advertise),
    ):
        if value is not None:
            try:
                split_host_port(value)
            except ValueError as exc:
                problems.append(f"{flag}: {exc}")
    if config.instance_id is not None and not INSTANCE_ID.fullmatch(config.instance_id):
        problems.append("--instance-id: 3-64 of [A-Za-z0-9._-], starting with a letter or digit")
    if config.pairing_code is not None and not PAIRING_CODE.fullmatch(config.pairing_code):
        problems.append("--pairing-code: 6-64 of [A-Za-z0-9-]")
    if not config.time_scale > 0:
        problems.append("--time-scale: must be positive")
    if not 0 <= config.fleet <= MAX_FLEET:
        problems.append(f"--fleet: 0 to {MAX_FLEET}")
    if config.fleet and (config.instance_id or config.pairing_code):
        problems.append("--instance-id and --pairing-code do not apply to a fleet (see fleet.csv)")
    if config.fleet and not INSTANCE_ID.fullmatch(f"{config.id_prefix}-{config.fleet - 1}"):
        problems.append(
            "--id-prefix: instance ids must be 3-64 of [A-Za-z0-9._-], starting with a letter or digit"
        )
    if (config.tls_cert is None) != (config.tls_key is None):
        problems.append("--tls-cert and --tls-key go together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        problems.append("--tls-client-ca needs --tls-cert and --tls-key")
    if config.registration_concurrency < 1:
        problems.append("--registration-concurrency: at least 1")
    return problems


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Parses flags (and `AIIDA_*` variables); exits with a usage message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = Config(
        marketplace=args.marketplace,
        listen=args.listen,
        advertise=args.advertise,
        state_dir=args.state_dir,
        profiles=tuple(Path(p) for p in args.profile or ()),
        instance_id=args.instance_id,
        pairing_code=args.pairing_code,
        time_scale=args.time_scale,
        fleet=args.fleet,
        id_prefix=args.id_prefix,
        log_level=args.log_level,
        grace_period=args.grace_period,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        marketplace_ca=args.marketplace_ca,
        sink_ca=args.sink_ca,
        registration_concurrency=args.registration_concurrency,
    )
    problems = _check(config)
    if problems:
        parser.error("; ".join(problems))
    return config
