"""Flags with environment-variable fallbacks, documented in `--help`."""

from __future__ import annotations

import argparse
import os
from typing import Any


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose every flag falls back to an environment variable."""

    def __init__(self, *args: Any, env_prefix: str, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.env_prefix = env_prefix
        self.env_names: dict[str, str] = {}

    def add_flag(self, flag: str, *, help: str, env: str | None = None, **kwargs: Any) -> None:
        """Adds `flag`, reading `PREFIX_FLAG_NAME` from the environment when unset."""
        name = env or self.env_prefix + "_" + flag.lstrip("-").upper().replace("-", "_")
        dest = flag.lstrip("-").replace("-", "_")
        self.env_names[dest] = name
        if name in os.environ:
            raw = os.environ[name]
            action = kwargs.get("action")
            if action == "store_true":
                kwargs["default"] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif action == "append":
                kwargs["default"] = [v for v in raw.split(",") if v]
            else:
                conv = kwargs.get("type", str)
                kwargs["default"] = conv(raw)
            kwargs["required"] = False
        super().add_argument(flag, help=f"{help} [env {name}]", **kwargs)


def split_host_port(value: str) -> tuple[str, int]:
    """Splits `host:port` (IPv6 as `[::1]:50051`), validating the port."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)
