"""AIP-158 pagination for every program: page sizes and opaque, tamper-proof page tokens.

A page token is `base64url(json cursor + HMAC-SHA256/128)`, in its canonical
encoding only. It binds the RPC method and a digest of the request's filters, so
a token cannot be replayed against another list or with changed filters, and a
client cannot forge a cursor. The key outlives restarts: the marketplace derives
it from its signing key, the sink keeps a random one in its database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from eddie_common.errors import InvalidArgument
from eddie_common.tokens import SigningKey

__all__ = ["MAX_PAGE_TOKEN_LENGTH", "PageTokenCodec", "invalid_page_token", "page_size"]

MAX_PAGE_TOKEN_LENGTH = 1024
_MAC_BYTES = 16
_FILTER_DIGEST_CHARS = 16

T = TypeVar("T")


def invalid_page_token() -> InvalidArgument:
    return InvalidArgument.for_field(
        "page_token", "not a page token of this list with these filters", reason="INVALID_PAGE_TOKEN"
    )


def page_size(value: int, default: int = 50, maximum: int = 500) -> int:
    """The effective page size: 0 means `default`, larger than `maximum` is capped."""
    if value < 0:
        raise InvalidArgument.for_field("page_size", "must not be negative")
    if value == 0:
        return default
    return min(value, maximum)


def _filter_digest(filters: Mapping[str, Any]) -> str:
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:_FILTER_DIGEST_CHARS]


class PageTokenCodec:
    """Encodes and verifies page tokens with one secret key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("page token key too short")
        self._key = key

    @classmethod
    def from_signing_key(cls, signing_key: SigningKey) -> PageTokenCodec:
        secret = signing_key.private_key.private_numbers().private_value.to_bytes(32, "big")
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"page-token")
        return cls(hkdf.derive(secret))

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, method: str, filters: Mapping[str, Any], cursor: Mapping[str, Any]) -> str:
        """A token continuing `method` with `filters` after `cursor` (JSON-serializable values)."""
        body = {"m": method, "f": _filter_digest(filters), "c": dict(cursor)}
        payload = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return base64.urlsafe_b64encode(payload + self._mac(payload)).decode().rstrip("=")

    def decode(self, token: str, method: str, filters: Mapping[str, Any]) -> dict[str, Any] | None:
        """The cursor of `token` (None for an empty token); raises INVALID_PAGE_TOKEN otherwise."""
        if not token:
            return None
        if len(token) > MAX_PAGE_TOKEN_LENGTH or not token.isascii():
            raise invalid_page_token()
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise invalid_page_token() from None
        # Only the canonical encoding is accepted (b64decode skips stray characters).
        if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token or len(raw) <= _MAC_BYTES:
            raise invalid_page_token()
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise invalid_page_token()
        try:
            body = json.loads(payload)
        except ValueError:
            raise invalid_page_token() from None
        if not isinstance(body, dict) or not isinstance(body.get("c"), dict):
            raise invalid_page_token()
        if body.get("m") != method or body.get("f") != _filter_digest(filters):
            raise invalid_page_token()
        cursor: dict[str, Any] = body["c"]
        return cursor

    def page(
        self,
        rows: Sequence[T],
        size: int,
        method: str,
        filters: Mapping[str, Any],
        cursor: Callable[[T], Mapping[str, Any]],
    ) -> tuple[list[T], str]:
        """The first `size` of `rows` (read as `size + 1`: one more says another page follows) and
        the token continuing after the last of them ("" when nothing follows)."""
        if len(rows) <= size:
            return list(rows), ""
        page = list(rows[:size])
        return page, self.encode(method, filters, cursor(page[-1]))

    def decode_int(self, token: str, method: str, filters: Mapping[str, Any], key: str) -> int | None:
        """The integer cursor field `key` of `token` (None for an empty token)."""
        cursor = self.decode(token, method, filters)
        if cursor is None:
            return None
        value = cursor.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid_page_token()
        return value
