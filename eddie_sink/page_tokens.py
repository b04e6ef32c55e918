"""Opaque, tamper-proof ListReadings page tokens (AIP-158).

A token is base64url(HMAC-SHA256 tag || JSON cursor). The cursor names the
permission it belongs to and the (time, data_tag) of the last reading served;
the key is random and kept in the database, so tokens survive a restart and
cannot be forged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

from eddie_common.errors import InvalidArgument

_TAG_BYTES = 16
MAX_PAGE_TOKEN_LENGTH = 1024


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: after (time_ns, data_tag) of `permission_id`."""

    permission_id: str
    time_ns: int
    data_tag: str


class PageTokens:
    """Signs and checks page tokens with one secret key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("page token key too short")
        self._key = key

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_TAG_BYTES]

    def encode(self, cursor: Cursor) -> str:
        body = json.dumps(
            {"p": cursor.permission_id, "t": cursor.time_ns, "g": cursor.data_tag}, separators=(",", ":")
        ).encode()
        return base64.urlsafe_b64encode(self._tag(body) + body).decode().rstrip("=")

    def decode(self, token: str, permission_id: str) -> Cursor:
        """The cursor of `token`, which must have been issued for `permission_id`."""
        invalid = InvalidArgument.for_field(
            "page_token", "not a page token of this listing", "INVALID_PAGE_TOKEN"
        )
        if len(token) > MAX_PAGE_TOKEN_LENGTH:
            raise invalid
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise invalid from None
        tag, body = raw[:_TAG_BYTES], raw[_TAG_BYTES:]
        if len(tag) != _TAG_BYTES or not hmac.compare_digest(tag, self._tag(body)):
            raise invalid
        try:
            fields = json.loads(body)
            cursor = Cursor(fields["p"], fields["t"], fields["g"])
        except (ValueError, KeyError, TypeError):
            raise invalid from None
        valid_types = isinstance(cursor.time_ns, int) and isinstance(cursor.data_tag, str)
        if cursor.permission_id != permission_id or not valid_types:
            raise invalid
        return cursor
