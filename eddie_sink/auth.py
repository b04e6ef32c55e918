"""Who is calling: a sink token for Publish, a marketplace access token for ListReadings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eddie_common.errors import Unauthenticated
from eddie_common.interceptors import caller_as
from eddie_common.tokens import AUDIENCE_MARKETPLACE, AUDIENCE_SINK, bearer_token
from eddie_sink.keys import MarketplaceKeys

SERVICE = "/eddie.framework.v1.DataSinkService/"
PUBLISH_METHOD = SERVICE + "Publish"
LIST_READINGS_METHOD = SERVICE + "ListReadings"
# How long a call made before the keys are loaded waits for them before failing UNAVAILABLE.
KEYS_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class Publisher:
    """An AIIDA holding the sink token of one permission."""

    permission_id: str
    eligible_party: str
    instance_id: str
    sink_token: str = ""
    # The end of the permission's data window (the token's `permission_end` claim), in ns; None: unknown.
    end_ns: int | None = None


@dataclass(frozen=True)
class Account:
    """A marketplace account holding an access token."""

    name: str
    role: str


class SinkAuthenticator:
    """The `eddie_common.interceptors.Authenticator` of the sink."""

    def __init__(self, keys: MarketplaceKeys) -> None:
        self.keys = keys

    async def __call__(self, method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> Any:
        token = bearer_token(metadata)
        if not token:
            raise Unauthenticated("missing bearer token", reason="TOKEN_MISSING")
        if not self.keys.ready:
            await self.keys.wait_ready(KEYS_WAIT_SECONDS)
        if method == PUBLISH_METHOD:
            return publisher_of(await self.keys.verify(token, AUDIENCE_SINK), token)
        if method == LIST_READINGS_METHOD:
            return account_of(await self.keys.verify(token, AUDIENCE_MARKETPLACE))
        raise Unauthenticated("method not available", reason="TOKEN_INVALID")


def publisher_of(claims: dict[str, Any], token: str = "") -> Publisher:
    """The publisher of a verified sink token (`token` itself); its subject must name its permission."""
    permission_id = claims.get("permission_id")
    eligible_party = claims.get("eligible_party")
    instance_id = claims.get("instance_id", "")
    end = claims.get("permission_end")
    valid = (
        isinstance(permission_id, str)
        and permission_id
        and claims.get("sub") == f"permissions/{permission_id}"
        and isinstance(eligible_party, str)
        and eligible_party.startswith("accounts/")
        and isinstance(instance_id, str)
        and (end is None or (isinstance(end, int) and not isinstance(end, bool)))
    )
    if not valid:
        raise Unauthenticated("invalid sink token", reason="TOKEN_INVALID")
    end_ns = None if end is None else int(end) * 1_000_000_000
    return Publisher(str(permission_id), str(eligible_party), str(instance_id), token, end_ns)


def account_of(claims: dict[str, Any]) -> Account:
    subject = claims["sub"]
    if not subject.startswith("accounts/"):
        raise Unauthenticated("invalid access token", reason="TOKEN_INVALID")
    # Explicit typing (RFC 8725 §3.11): the marketplace marks access tokens `typ: access`;
    # a token typed as anything else is refused (an untyped one is tolerated, as before).
    if claims.get("typ", "access") != "access":
        raise Unauthenticated("not an access token", reason="TOKEN_WRONG_TYPE")
    role = claims.get("role")
    return Account(subject, role if isinstance(role, str) else "")


def current_publisher() -> Publisher:
    principal = caller_as(Publisher)
    if principal is None:
        raise Unauthenticated("a sink token is required", reason="TOKEN_INVALID")
    return principal


def current_account() -> Account:
    principal = caller_as(Account)
    if principal is None:
        raise Unauthenticated("an access token is required", reason="TOKEN_INVALID")
    return principal


__all__ = [
    "LIST_READINGS_METHOD",
    "PUBLISH_METHOD",
    "Account",
    "Publisher",
    "SinkAuthenticator",
    "current_account",
    "current_publisher",
]
