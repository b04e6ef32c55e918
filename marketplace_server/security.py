"""Hashing and identifiers.

Passwords and short pairing codes: argon2id (slow on purpose). High-entropy
random secrets (instance secrets, refresh tokens): SHA-256, the standard for
secrets that cannot be guessed; a slow hash there would only cost start-up time.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_password_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Pairing codes are checked online with attempts rate-limited; a lighter argon2 keeps
# 10,000 registrations of a fleet fast while still not storing the code.
_code_hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@functools.cache
def _dummy_password_hash() -> str:
    """What a password is checked against when the account does not exist (made on first use, in
    the worker thread: hashing it at import cost every program start ~50 ms)."""
    return _password_hasher.hash("dummy password for timing equalisation")


def new_id() -> str:
    """A random URL-safe resource id (128 bits, 22 characters)."""
    return secrets.token_urlsafe(16).replace("-", "a").replace("_", "b")


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def digests_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _verify(hasher: PasswordHasher, stored: str, candidate: str) -> bool:
    try:
        return hasher.verify(stored, candidate)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _verify_password(stored: str | None, candidate: str) -> bool:
    # An unknown account is checked against the dummy hash, here in the worker thread.
    return _verify(_password_hasher, stored or _dummy_password_hash(), candidate)


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_password_hasher.hash, password)


async def verify_password(stored: str | None, candidate: str) -> bool:
    """Constant work whether or not the account exists (no e-mail enumeration by timing)."""
    return await asyncio.to_thread(_verify_password, stored, candidate)


def hash_pairing_code(code: str) -> str:
    return _code_hasher.hash(code.upper())


async def verify_pairing_code(stored: str, candidate: str) -> bool:
    return await asyncio.to_thread(_verify, _code_hasher, stored, candidate.upper())
