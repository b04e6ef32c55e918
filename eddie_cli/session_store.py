"""The signed-in session kept between calls: `$XDG_CONFIG_HOME/eddie/session.json`, mode 0600.

It holds the marketplace address, the access and refresh tokens and the account; never the
password. The file is replaced atomically so a crash never leaves half a session behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf import json_format

from eddie.marketplace.v1 import identity_pb2

SESSION_FILE = "session.json"
# Refresh this long before the access token expires, so a call never starts with a dying token.
REFRESH_MARGIN_SECONDS = 30.0


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/eddie`, or `~/.config/eddie` when XDG_CONFIG_HOME is unset or empty."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "eddie"


@dataclass
class StoredSession:
    """What `eddie login` remembers."""

    marketplace: str
    access_token: str
    refresh_token: str
    expire_time: str  # RFC 3339
    refresh_expire_time: str  # RFC 3339
    account: dict[str, object]  # the Account in protobuf JSON

    @classmethod
    def from_token(cls, marketplace: str, token: identity_pb2.Token) -> StoredSession:
        return cls(
            marketplace=marketplace,
            access_token=token.access_token,
            refresh_token=token.refresh_token,
            expire_time=token.expire_time.ToJsonString(),
            refresh_expire_time=token.refresh_expire_time.ToJsonString(),
            account=json_format.MessageToDict(token.account),
        )

    def refreshed(self, token: identity_pb2.Token) -> StoredSession:
        """This session with the rotated tokens of a RefreshToken answer."""
        return StoredSession.from_token(self.marketplace, token)

    @property
    def account_proto(self) -> identity_pb2.Account:
        return json_format.ParseDict(self.account, identity_pb2.Account(), ignore_unknown_fields=True)

    def access_token_fresh(self, now: datetime | None = None) -> bool:
        """Whether the access token is valid for at least REFRESH_MARGIN_SECONDS more."""
        expires = _parse_time(self.expire_time)
        current = now or datetime.now(UTC)
        return expires is not None and (expires - current).total_seconds() > REFRESH_MARGIN_SECONDS


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def session_path() -> Path:
    return config_dir() / SESSION_FILE


def load_session() -> StoredSession | None:
    """The stored session, or None when nobody is signed in (or the file is unreadable)."""
    path = session_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return StoredSession(**data)
    except (OSError, ValueError, TypeError):
        return None


def save_session(session: StoredSession) -> Path:
    """Writes the session with mode 0600 (its directory 0700), atomically."""
    directory = config_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / SESSION_FILE
    fd, temporary = tempfile.mkstemp(prefix=".session-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(session), handle, indent=2)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def delete_session() -> bool:
    """Forgets the session; True if there was one."""
    path = session_path()
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed
