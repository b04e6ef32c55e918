"""One rule for the free text callers send: what a line may hold.

A line may hold letters, marks, numbers, punctuation, symbols and spaces of any
kind, and the zero-width (non-)joiners some scripts and emoji need; no control,
format, surrogate or private-use characters, and no line or paragraph separators.
"""

from __future__ import annotations

import unicodedata

__all__ = ["multi_line", "one_line", "single_line"]

_JOINERS = frozenset("\u200c\u200d")
_SEPARATORS = frozenset("\u2028\u2029")


def _in_line(c: str) -> bool:
    return c in _JOINERS or (unicodedata.category(c)[0] != "C" and c not in _SEPARATORS)


def single_line(text: str) -> bool:
    """Whether `text` is one line of the allowed characters."""
    return all(_in_line(c) for c in text)


def multi_line(text: str) -> bool:
    """Whether `text` is lines of the allowed characters (and tabs) separated by CR/LF."""
    return single_line(text.replace("\n", "").replace("\r", "").replace("\t", ""))


def one_line(text: str, limit: int) -> str:
    """`text` from elsewhere made one line: other characters and runs of spaces become one space,
    at most `limit` characters."""
    return " ".join("".join(c if _in_line(c) else " " for c in text).split())[:limit]
