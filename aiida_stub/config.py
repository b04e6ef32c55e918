"""Command-line flags (with `AIIDA_*` environment fallbacks) and the resulting config."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eddie_common.flags import (
    Program,
    at_least,
    file_flag,
    flag,
    grace_period_flag,
    host_port,
    log_level_flag,
    metrics_listen_flag,
    positive,
    tls_problems,
)

INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,63}")
PAIRING_CODE = re.compile(r"[A-Za-z0-9-]{6,64}")
MAX_FLEET = 100_000


def _instance_id(value: str) -> None:
    if not INSTANCE_ID.fullmatch(value):
        raise ValueError(f"3-64 of [A-Za-z0-9._-], starting with a letter or digit, got {value!r}")


def _pairing_code(value: str) -> None:
    if not PAIRING_CODE.fullmatch(value):
        raise ValueError(f"6-64 of [A-Za-z0-9-], got {value!r}")


@dataclass(frozen=True)
class Config:
    """Everything `create_server` needs; tests build one directly."""

    marketplace: str = flag("marketplace to register at", metavar="HOST:PORT", check=host_port)
    listen: str = flag(
        "address to serve eddie.aiida.v1.AiidaService on; port 0 picks a free port",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        check=host_port,
    )
    advertise: str | None = flag(
        "address the marketplace dials (sent with RegisterInstance); "
        "default: the listen host and the bound port",
        default=None,
        metavar="HOST:PORT",
        check=host_port,
    )
    tls_cert: Path | None = file_flag("PEM certificate to serve TLS with")
    tls_key: Path | None = file_flag("PEM private key of --tls-cert")
    tls_client_ca: Path | None = file_flag(
        "PEM CA bundle; when set, callers (the marketplace) must present a certificate it signed "
        "(mutual TLS; needs --tls-cert)"
    )
    marketplace_ca: Path | None = file_flag(
        "PEM CA to dial the marketplace over TLS with (default: plaintext)"
    )
    sink_ca: Path | None = file_flag("PEM CA for grpcs:// sinks (default: the system roots)")
    state_dir: Path = flag(
        "directory of the persistent state (instance ids, secrets, pairing codes, data accesses)",
        default=Path("var/aiida"),
        metavar="DIR",
    )
    profiles: tuple[Path, ...] = flag(
        "household profile (TOML); repeatable, or a directory of *.toml profiles; one instance "
        "uses the first, a fleet takes them round-robin (default: the shipped vienna-p1.toml, "
        "or every shipped profile for a fleet)",
        name="profile",
        default=(),
        metavar="FILE",
    )
    instance_id: str | None = flag(
        "this instance's id (default: a generated aiida-<hex>, kept in the state dir)",
        default=None,
        metavar="ID",
        check=_instance_id,
    )
    pairing_code: str | None = flag(
        "the code the owner enters to claim the device (6-64 of [A-Za-z0-9-]); "
        "default: generated once and kept in the state dir; printed at start-up",
        default=None,
        metavar="CODE",
        check=_pairing_code,
    )
    time_scale: float = flag(
        "run the simulated meter X times faster than the clock (60: a simulated minute per second)",
        default=1.0,
        metavar="X",
        check=positive,
    )
    fleet: int = flag(
        "fleet simulator: host N instances <prefix>-0 .. <prefix>-(N-1) behind --listen (0: off)",
        default=0,
        metavar="N",
        check=at_least(0, MAX_FLEET),
    )
    id_prefix: str = flag("instance id prefix of the fleet", default="aiida-fleet", metavar="P")
    registration_concurrency: int = flag(
        "registrations in flight at once (fleet)", default=64, metavar="N", check=at_least(1)
    )
    log_level: str = log_level_flag()
    grace_period: float = grace_period_flag(
        "how long in-flight calls may finish on SIGINT/SIGTERM", default=5.0
    )
    metrics_listen: str | None = metrics_listen_flag()
    # Not flags: retry pacing of registration and of sink connections (tests shorten them).
    retry_initial_delay: float = 0.2
    retry_max_delay: float = 5.0

    def problems(self) -> list[str]:
        """What is wrong with the combination of options (each option is checked on its own first)."""
        return _check(self)


PROGRAM = Program(
    prog="aiida-stub",
    env_prefix="AIIDA",
    description="Reference AIIDA device: registers at the marketplace, answers search queries from a "
    "local household profile, and streams simulated meter readings to eligible parties' sinks. "
    "With --fleet N it hosts N instances behind one port.",
    config=Config,
)


def build_parser() -> argparse.ArgumentParser:
    return PROGRAM.parser()


def _check(config: Config) -> list[str]:
    problems: list[str] = []
    if config.fleet and (config.instance_id or config.pairing_code):
        problems.append("--instance-id and --pairing-code do not apply to a fleet (see fleet.csv)")
    if config.fleet and not INSTANCE_ID.fullmatch(f"{config.id_prefix}-{config.fleet - 1}"):
        problems.append(
            f"--id-prefix: instance ids must be 3-64 of [A-Za-z0-9._-], starting with a letter or digit, "
            f"got {config.id_prefix!r}"
        )
    problems.extend(tls_problems(config.tls_cert, config.tls_key, config.tls_client_ca))
    return problems


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Parses flags (and `AIIDA_*` variables); exits 2 with one line on bad input."""
    return PROGRAM.parse(argv)
