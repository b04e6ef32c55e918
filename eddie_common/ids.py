"""Ids one program hands to another, checked the same way wherever they arrive."""

from __future__ import annotations

import re

__all__ = ["MAX_PERMISSION_ID", "PERMISSION_ID", "is_permission_id"]

# A permission id as an AIIDA and a sink accept it: the marketplace mints 22 characters of this
# alphabet (and accepts at most 32 in its own names), the others leave room for another marketplace.
MAX_PERMISSION_ID = 128
PERMISSION_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_PERMISSION_ID}}}", re.ASCII)


def is_permission_id(text: str) -> bool:
    return PERMISSION_ID.fullmatch(text) is not None
