"""`aiida-stub` / `python -m aiida_stub`: the reference AIIDA device (or a fleet of them)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aiida_stub.config import PROGRAM, Config, parse_config
from aiida_stub.profile import ProfileError, load_profiles
from aiida_stub.server import run
from aiida_stub.state import StateError
from eddie_common.logging import configure_logging
from eddie_common.startup import StartupError, UsageError, free_port, readable_file, run_main, writable_dir


def preflight(config: Config) -> None:
    """Files readable, profiles valid, the state dir writable, the port free: nothing created yet."""
    for flag, path in (
        ("--tls-cert", config.tls_cert),
        ("--tls-key", config.tls_key),
        ("--tls-client-ca", config.tls_client_ca),
        ("--marketplace-ca", config.marketplace_ca),
        ("--sink-ca", config.sink_ca),
    ):
        readable_file(flag, path)
    if config.profiles:
        load_profiles(config.profiles)
    writable_dir("--state-dir", config.state_dir)
    free_port("--listen", config.listen, PROGRAM.prog)
    if config.metrics_listen is not None:
        free_port("--metrics-listen", config.metrics_listen, PROGRAM.prog)


def explain(exc: BaseException) -> StartupError | None:
    if isinstance(exc, ProfileError):
        return UsageError(f"--profile {exc}")
    if isinstance(exc, StateError):
        return UsageError(f"--state-dir {exc}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    configure_logging(config.log_level)
    return run_main(
        PROGRAM.prog, config.log_level, lambda: preflight(config), lambda: run(config), translate=explain
    )


if __name__ == "__main__":
    sys.exit(main())
