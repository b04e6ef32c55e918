"""The marketplace an instance registered at: its public key and issuer, and the verifier built from them.

Registration establishes it (trust on first use); authentication (`auth`) checks
every call against it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from eddie_common import tokens

__all__ = ["MarketplaceTrust", "trust_for"]


@dataclass(frozen=True, eq=False)
class MarketplaceTrust:
    """The key and issuer of the marketplace an instance registered at."""

    public_key_pem: str
    issuer: str
    verifier: tokens.TokenVerifier


@functools.lru_cache(maxsize=16)
def trust_for(public_key_pem: str, issuer: str) -> MarketplaceTrust:
    """The trust in one marketplace key (shared by every instance of a fleet); ValueError if unusable."""
    key = tokens.load_public_key(public_key_pem)
    verifier = tokens.TokenVerifier(
        {tokens.key_id_of(key): key}, issuer=issuer, audience=tokens.AUDIENCE_AIIDA
    )
    return MarketplaceTrust(public_key_pem, issuer, verifier)
