"""Long id lists in pieces: SQLite allows 32,766 bound parameters, asyncpg 32,767; 500 keeps each
`IN (...)` statement small and its plan cached."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

__all__ = ["IN_LIST_CHUNK", "chunked"]

IN_LIST_CHUNK = 500

T = TypeVar("T")


def chunked(items: Sequence[T], size: int = IN_LIST_CHUNK) -> Iterator[list[T]]:
    """`items` in consecutive lists of at most `size`."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
