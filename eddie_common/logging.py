"""Structured one-line logs: `ts level logger event=... key=value`.

Values are quoted when they contain spaces; callers never pass secrets (tokens,
passwords, pairing codes) as fields.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


def _format_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """Formats a record as one line of key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{ts}.{int(record.msecs):03d}Z", record.levelname.lower(), record.name]
        parts.append(f"event={_format_value(record.getMessage())}")
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_") and key not in ("message", "asctime"):
                parts.append(f"{key}={_format_value(value)}")
        if record.exc_info:
            parts.append("exc=" + _format_value(self.formatException(record.exc_info)))
        return " ".join(parts)


def configure_logging(level: str = "info") -> None:
    """Sends structured logs to stderr at `level` (debug, info, warning, error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Logs `event` with `fields` as key=value pairs."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra=fields)
