"""Client channels, the same way in every program: TLS when there are credentials, else plaintext."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

__all__ = ["dial"]


def dial(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """A client channel to `target`: TLS with `credentials`, plaintext without."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)
