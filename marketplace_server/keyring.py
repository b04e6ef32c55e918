"""The marketplace's signing keys: the current key and the earlier ones (a key ring).

In the data dir:

    signing-key.pem                    the current key (0600)
    retired-signing-keys/<kid>.pem     earlier keys (0600), kept so what they signed still verifies

The current key signs new access tokens, sink tokens and consent receipts.
`ListSigningKeys` lists every key of the ring, so receipts and tokens signed
before a rotation still verify (sinks refetch the list on an unknown `kid`).

Rotation: `marketplace-server --rotate-signing-key` moves the current key into
`retired-signing-keys/` and creates a new one before serving. AIIDAs pin the one
key `RegisterInstance` gave them and verify the marketplace's calls with it, so
the calls to AIIDAs are signed with the *device key*, the oldest key of the ring,
and `RegisterInstance` hands out that key: a rotation never cuts off a running
AIIDA. Retiring the device key for good (deleting its file) needs every AIIDA to
register again (they do at each start-up).

On PostgreSQL (one process or a cluster of replicas) the ring lives in the database
instead, table `signing_keys`: every process on the database signs and verifies with
the same keys, and a replica needs no persistent --data-dir. The newest row is the
current key, the oldest the device key. The first process creates it (under an advisory
lock, so replicas starting at once end with one key); an existing ring in --data-dir is
imported then, so a deployment moving from files to the database keeps its tokens and
receipts verifiable. `--rotate-signing-key` at one replica rotates for all: the others
re-read the ring every `KEY_REFRESH_SECONDS` (and at once on a token with an unknown
`kid`), so they sign with the new key within that bound and verify it immediately.
`LiveKeys` holds the ring in use and updates everything that signs or verifies with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie_common.errors import Unauthenticated
from eddie_common.logging import log_event
from eddie_common.tokens import SigningKey, TokenIssuer, TokenVerifier, key_id_of
from marketplace_server.background import Loop
from marketplace_server.clock import utcnow
from marketplace_server.db.models import SigningKeyRow

__all__ = [
    "CURRENT_KEY_FILE",
    "KEY_REFRESH_SECONDS",
    "RETIRED_KEYS_DIR",
    "KeyRing",
    "LiveKeys",
    "load_database_key_ring",
    "load_key_ring",
    "read_database_key_ring",
    "rotate_signing_key",
]

log = logging.getLogger(__name__)

KEY_REFRESH_SECONDS = 5.0  # a rotation at one replica reaches the others' signing within this
UNKNOWN_KID_PAUSE = 0.5  # at most one re-read per this interval for tokens with an unknown kid
_KID = re.compile(r"[A-Za-z0-9_-]{22}")  # key_id_of's shape: anything else is never ours

CURRENT_KEY_FILE = "signing-key.pem"
RETIRED_KEYS_DIR = "retired-signing-keys"


@dataclass(frozen=True)
class KeyRing:
    """The current key first, then the retired ones, oldest last."""

    current: SigningKey
    retired: tuple[SigningKey, ...] = ()

    @property
    def keys(self) -> list[SigningKey]:
        return [self.current, *self.retired]

    @property
    def device_key(self) -> SigningKey:
        """The key AIIDAs trust: the oldest of the ring."""
        return self.keys[-1]


def _load(path: Path) -> SigningKey:
    return SigningKey.load_or_create(path)


def _retired(data_dir: Path) -> tuple[SigningKey, ...]:
    """The retired keys, newest first (by the time they were retired)."""
    folder = data_dir / RETIRED_KEYS_DIR
    if not folder.is_dir():
        return ()
    files = sorted(folder.glob("*.pem"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    return tuple(_load(p) for p in files)


def rotate_signing_key(data_dir: Path) -> SigningKey:
    """Retires the current key (if any) and creates a new current key; returns the new key."""
    current_path = data_dir / CURRENT_KEY_FILE
    if current_path.exists():
        old = _load(current_path)
        folder = data_dir / RETIRED_KEYS_DIR
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = folder / f"{old.key_id}.pem"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                old.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        current_path.unlink()
    return _load(current_path)


def load_key_ring(data_dir: Path, rotate: bool = False) -> KeyRing:
    """The ring of `data_dir` (created on first start), rotated first if `rotate`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    current = rotate_signing_key(data_dir) if rotate else _load(data_dir / CURRENT_KEY_FILE)
    retired = tuple(k for k in _retired(data_dir) if k.key_id != current.key_id)
    return KeyRing(current, retired)


# --- the ring in the database (PostgreSQL) ---


def _pem(key: SigningKey) -> str:
    return key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _from_pem(pem: str) -> SigningKey:
    private = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ValueError("a signing key in the database is not an EC private key")
    return SigningKey(private, key_id_of(private.public_key()))


def _data_dir_keys(data_dir: Path) -> list[SigningKey]:
    """The ring of `data_dir`, oldest first (the device key first); [] when it has none."""
    if not (data_dir / CURRENT_KEY_FILE).is_file():
        return []
    current = _load(data_dir / CURRENT_KEY_FILE)
    retired = [k for k in _retired(data_dir) if k.key_id != current.key_id]
    return [*reversed(retired), current]


async def _lock_ring(session: AsyncSession) -> None:
    """One process at a time creates, imports or rotates (until the transaction ends)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(
            text(
                "SELECT pg_advisory_xact_lock(hashtext('eddie-signing-keys:' || "
                "coalesce(current_schema(), '')))"
            )
        )


async def read_database_key_ring(sessions: async_sessionmaker[AsyncSession]) -> KeyRing:
    """The ring as stored: the newest row is the current key, the oldest the device key."""
    async with sessions() as session:
        pems = (await session.scalars(select(SigningKeyRow.private_key_pem).order_by(SigningKeyRow.id))).all()
    if not pems:
        raise RuntimeError("the signing_keys table is empty")
    keys = [_from_pem(pem) for pem in pems]
    return KeyRing(keys[-1], tuple(reversed(keys[:-1])))


async def load_database_key_ring(
    sessions: async_sessionmaker[AsyncSession], data_dir: Path, rotate: bool = False
) -> KeyRing:
    """The ring of the database: created (or imported from `data_dir`) by the first process, rotated
    first if `rotate`."""
    async with sessions.begin() as session:
        await _lock_ring(session)
        current_id = await session.scalar(select(SigningKeyRow.id).order_by(SigningKeyRow.id.desc()).limit(1))
        now = utcnow()
        if current_id is None:
            imported = _data_dir_keys(data_dir)
            keys = imported or [SigningKey.generate()]
            for index, key in enumerate(keys):
                retired = now if index < len(keys) - 1 else None
                session.add(
                    SigningKeyRow(
                        key_id=key.key_id, private_key_pem=_pem(key), create_time=now, retire_time=retired
                    )
                )
            await session.flush()
            if imported:
                log_event(log, "signing_keys_imported", count=len(imported), data_dir=str(data_dir))
            else:
                log_event(log, "signing_key_created", key_id=keys[0].key_id)
        elif _data_dir_keys(data_dir):
            log_event(log, "signing_keys_in_database", data_dir=str(data_dir), note="data-dir keys not used")
        if rotate:
            await session.execute(
                update(SigningKeyRow).where(SigningKeyRow.retire_time.is_(None)).values(retire_time=now)
            )
            key = SigningKey.generate()
            session.add(SigningKeyRow(key_id=key.key_id, private_key_pem=_pem(key), create_time=now))
            log_event(log, "signing_key_rotated", key_id=key.key_id)
    return await read_database_key_ring(sessions)


# --- the ring in use ---


class LiveKeys:
    """The key ring in use, and everything that signs or verifies with it, kept up to date.

    With `sessions` (the ring in the database) the ring is re-read every `refresh_seconds` and when a
    token names a `kid` not in the ring; every issuer, verifier and listener attached is updated in
    place. Without, the ring is the data dir's, fixed for the process's life.
    """

    def __init__(
        self,
        ring: KeyRing,
        sessions: async_sessionmaker[AsyncSession] | None = None,
        refresh_seconds: float = KEY_REFRESH_SECONDS,
    ) -> None:
        self.ring = ring
        self.sessions = sessions
        self.refresh_seconds = refresh_seconds
        self.listeners: list[Callable[[KeyRing], None]] = []
        self._read_at = time.monotonic()
        self._lock = asyncio.Lock()
        self.loop = Loop(self._refresh_round, "signing_keys_refresh")

    @property
    def shared(self) -> bool:
        return self.sessions is not None

    @property
    def current(self) -> SigningKey:
        return self.ring.current

    def known(self, kid: str) -> bool:
        return any(k.key_id == kid for k in self.ring.keys)

    # --- what follows the ring ---

    def signing(self, issuer: TokenIssuer) -> TokenIssuer:
        """`issuer` signs with the current key from now on."""
        self.listeners.append(lambda ring: setattr(issuer, "key", ring.current))
        return issuer

    def device_signing(self, issuer: TokenIssuer) -> TokenIssuer:
        """`issuer` signs with the device key (the oldest) from now on."""
        self.listeners.append(lambda ring: setattr(issuer, "key", ring.device_key))
        return issuer

    def verifying(self, verifier: TokenVerifier) -> TokenVerifier:
        """`verifier` accepts every key of the ring from now on."""

        def update_keys(ring: KeyRing) -> None:
            verifier.public_keys = {k.key_id: k.public_key for k in ring.keys}

        update_keys(self.ring)
        self.listeners.append(update_keys)
        return verifier

    async def verify(self, verifier: TokenVerifier, token: str) -> dict[str, Any]:
        """`verifier.verify`, re-reading the ring once when the token names a key not (yet) in it: a
        token signed at another replica right after a rotation verifies here too."""
        try:
            return verifier.verify(token)
        except Unauthenticated as exc:
            if exc.reason != "TOKEN_UNKNOWN_KEY" or not await self.learn(_unverified_kid(token)):
                raise
        return verifier.verify(token)

    # --- reading the ring ---

    async def learn(self, kid: str | None) -> bool:
        """Re-reads the ring for a `kid` it does not hold (at most once per UNKNOWN_KID_PAUSE, so
        forged kids cost little); True when the kid is in the ring now."""
        if not self.shared or kid is None or not _KID.fullmatch(kid):
            return False
        async with self._lock:  # concurrent callers share one read
            if self.known(kid):
                return True
            wait = self._read_at + UNKNOWN_KID_PAUSE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self._read()
            except Exception as exc:
                log_event(log, "signing_keys_read_failed", logging.WARNING, error=repr(exc)[:200])
                return False
        return self.known(kid)

    async def fresh(self, max_age: float = 1.0) -> KeyRing:
        """The ring, re-read first when the last read is older than `max_age` (ListSigningKeys)."""
        if self.shared and time.monotonic() - self._read_at > max_age:
            async with self._lock:
                if time.monotonic() - self._read_at > max_age:
                    try:
                        await self._read()
                    except Exception as exc:  # the ring as last read still answers
                        log_event(log, "signing_keys_read_failed", logging.WARNING, error=repr(exc)[:200])
        return self.ring

    async def refresh(self) -> bool:
        """Re-reads the ring now; True when it changed."""
        async with self._lock:
            return await self._read()

    async def _read(self) -> bool:
        assert self.sessions is not None
        async with self.sessions() as session:  # the ids first: the keys are parsed only on a change
            ids = (
                await session.scalars(select(SigningKeyRow.key_id).order_by(SigningKeyRow.id.desc()))
            ).all()
        self._read_at = time.monotonic()
        if list(ids) == [k.key_id for k in self.ring.keys]:
            return False
        ring = await read_database_key_ring(self.sessions)
        self.ring = ring
        for listener in self.listeners:
            listener(ring)
        log_event(log, "signing_keys_changed", current=ring.current.key_id, keys=len(ring.keys))
        return True

    async def _refresh_round(self) -> float:
        if self.shared:
            try:
                await self.refresh()
            except Exception as exc:  # the ring as last read keeps signing; the next round retries
                log_event(log, "signing_keys_read_failed", logging.WARNING, error=repr(exc)[:200])
        return self.refresh_seconds

    async def run(self) -> None:
        if self.shared:
            await self.loop.run()

    async def stop(self) -> None:
        await self.loop.stop()


def _unverified_kid(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return None
    return kid if isinstance(kid, str) else None
