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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from eddie_common.tokens import SigningKey

__all__ = ["CURRENT_KEY_FILE", "RETIRED_KEYS_DIR", "KeyRing", "load_key_ring", "rotate_signing_key"]

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
