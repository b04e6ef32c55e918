"""Access tokens of an external OpenID Connect provider (Keycloak, ...), beside the embedded IAM.

With `--oidc-issuer`, a bearer token whose `iss` is that issuer is verified
against the provider's published keys (discovery document -> `jwks_uri`), and
its `sub` is mapped to a marketplace account created on first use, with the role
taken from the `--oidc-role-claim` claim. The rules of RFC 8725:

- only the asymmetric algorithms the JWKS declares for each key (never `none`,
  never HMAC: a public key can't be confused with a shared secret), and the
  header's `alg` must be the key's;
- a `kid` is required; an unknown `kid` refetches the JWKS (the provider rotated
  its keys), at most once per `REFETCH_INTERVAL` so forged kids can't make the
  marketplace hammer the provider;
- `iss`, `aud` (must contain `--oidc-audience`), `exp`, `iat`, `sub` required;
  `nbf` honoured; ID tokens (`typ: ID`) are not access tokens.

The provider is never trusted for linking: an external account never takes
over an embedded one with the same e-mail; it is keyed by (issuer, subject).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import identity_pb2
from eddie_common.errors import PermissionDenied, Unauthenticated
from eddie_common.logging import log_event
from eddie_common.tokens import LEEWAY_SECONDS, MAX_TOKEN_LENGTH, decode_claims
from marketplace_server.clock import utcnow
from marketplace_server.db.models import AccountRow, ExternalIdentityRow
from marketplace_server.security import new_id

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_ROLE_CLAIM",
    "JwksCache",
    "OidcAuthenticator",
    "OidcDiscoveryError",
    "OidcSettings",
    "discover",
    "unverified_issuer",
]

log = logging.getLogger(__name__)

DEFAULT_ROLE_CLAIM = "eddie_role"
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
ROLE_VALUES = {
    "customer": identity_pb2.ROLE_CUSTOMER,
    "eligible_party": identity_pb2.ROLE_ELIGIBLE_PARTY,
}
HTTP_TIMEOUT = 5.0
MAX_DOCUMENT_BYTES = 1 << 20
REFETCH_INTERVAL = 10.0  # at most one JWKS fetch per this many seconds for unknown kids
KEYS_MAX_AGE = 3600.0  # keys are refreshed at least this often
_EC_CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}

Fetch = Callable[[str], Awaitable[dict[str, Any]]]


class OidcDiscoveryError(ConnectionError):
    """The provider's discovery document or key set could not be read (an unavailable dependency)."""


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    audience: str
    role_claim: str = DEFAULT_ROLE_CLAIM


def _fetch_json_blocking(url: str) -> dict[str, Any]:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise OidcDiscoveryError(f"{url}: only http(s) URLs are fetched")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:  # noqa: S310
        body = response.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise OidcDiscoveryError(f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    document = json.loads(body)
    if not isinstance(document, dict):
        raise OidcDiscoveryError(f"{url}: not a JSON object")
    return document


async def fetch_json(url: str) -> dict[str, Any]:
    """GETs a JSON object (in a thread: urllib blocks); OidcDiscoveryError on any failure."""
    try:
        return await asyncio.to_thread(_fetch_json_blocking, url)
    except OidcDiscoveryError:
        raise
    except Exception as exc:  # network, HTTP status, JSON: one error type for the caller
        raise OidcDiscoveryError(f"{url}: {type(exc).__name__}: {exc}") from None


async def discover(issuer: str, fetch: Fetch = fetch_json) -> str:
    """The provider's `jwks_uri`, from `{issuer}/.well-known/openid-configuration` (OIDC Discovery 1.0)."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    document = await fetch(url)
    if document.get("issuer") != issuer:
        raise OidcDiscoveryError(
            f"{url}: the document names issuer {document.get('issuer')!r}, not {issuer!r}"
        )
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str) or urllib.parse.urlsplit(jwks_uri).scheme not in ("http", "https"):
        raise OidcDiscoveryError(f"{url}: no http(s) jwks_uri")
    return jwks_uri


def _algorithm_of(jwk: dict[str, Any]) -> str | None:
    """The signing algorithm a JWK is for: its `alg`, or the usual one for its key type."""
    if jwk.get("use", "sig") != "sig":
        return None
    alg = jwk.get("alg")
    if alg is None:
        kty, crv = str(jwk.get("kty", "")), str(jwk.get("crv", ""))
        alg = _EC_CURVE_ALGORITHMS.get(crv) if kty == "EC" else {"RSA": "RS256", "OKP": "EdDSA"}.get(kty)
    return alg if alg in ASYMMETRIC_ALGORITHMS else None


class JwksCache:
    """The provider's signing keys by `kid`, refetched on an unknown kid (rate-limited, single-flight)."""

    def __init__(self, jwks_uri: str, fetch: Fetch = fetch_json) -> None:
        self.jwks_uri = jwks_uri
        self._fetch = fetch
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.refetch_interval = REFETCH_INTERVAL
        self.fetches = 0

    async def refresh(self) -> None:
        document = await self._fetch(self.jwks_uri)
        keys: dict[str, jwt.PyJWK] = {}
        for jwk in document.get("keys", []) if isinstance(document.get("keys"), list) else []:
            if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
                continue
            alg = _algorithm_of(jwk)
            if alg is None:
                continue
            try:
                keys[jwk["kid"]] = jwt.PyJWK(jwk, algorithm=alg)
            except jwt.PyJWTError:
                continue
        self._keys = keys
        self._fetched_at = time.monotonic()
        self.fetches += 1
        log_event(log, "oidc_keys_fetched", keys=len(keys))

    async def key_for(self, kid: str) -> jwt.PyJWK | None:
        key = self._keys.get(kid)
        age = time.monotonic() - self._fetched_at
        if key is not None and age < KEYS_MAX_AGE:
            return key
        async with self._lock:  # one fetch for all the calls waiting on the same unknown kid
            age = time.monotonic() - self._fetched_at
            if (kid not in self._keys and age >= self.refetch_interval) or age >= KEYS_MAX_AGE:
                try:
                    await self.refresh()
                except OidcDiscoveryError as exc:
                    log_event(log, "oidc_keys_fetch_failed", logging.WARNING, error=str(exc)[:300])
                    self._fetched_at = time.monotonic()  # the interval also limits retries
        return self._keys.get(kid)


def unverified_issuer(token: str) -> str | None:
    """The `iss` claim without verification: only to route a token to its verifier."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else None


def _claim(claims: dict[str, Any], path: str) -> Any:
    """A claim by dotted path (`realm_access.roles`), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def role_of(claims: dict[str, Any], claim: str) -> int:
    """The marketplace role named by `claim` (a string, or a list holding exactly one role name)."""
    value = _claim(claims, claim)
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    roles = {ROLE_VALUES[n] for n in names if isinstance(n, str) and n in ROLE_VALUES}
    if len(roles) != 1:
        raise PermissionDenied(
            f"the token's {claim} claim must name one role: customer or eligible_party",
            reason="OIDC_ROLE_INVALID",
        )
    return roles.pop()


def _printable(text: Any, limit: int) -> str:
    if not isinstance(text, str):
        return ""
    return "".join(c for c in text if c.isprintable()).strip()[:limit]


class OidcAuthenticator:
    """Verifies the provider's access tokens; maps `sub` to an account (created on first use)."""

    def __init__(
        self, settings: OidcSettings, keys: JwksCache, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.sessions = sessions
        self._accounts: dict[str, tuple[str, int]] = {}  # subject -> (account id, role)

    @classmethod
    async def connect(
        cls, settings: OidcSettings, sessions: async_sessionmaker[AsyncSession], fetch: Fetch = fetch_json
    ) -> OidcAuthenticator:
        """Discovers the provider and loads its keys; OidcDiscoveryError if it can't be reached."""
        keys = JwksCache(await discover(settings.issuer, fetch), fetch)
        await keys.refresh()
        return cls(settings, keys, sessions)

    def forget(self, account_id: str) -> None:
        """Drops the cached mapping of a deleted account (its subject gets a new account next time)."""
        self._accounts = {s: v for s, v in self._accounts.items() if v[0] != account_id}

    async def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid access token of the provider, or Unauthenticated with a precise reason."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("invalid token", reason="TOKEN_INVALID")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token", reason="TOKEN_INVALID") from None
        alg = header.get("alg")
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise Unauthenticated("token algorithm not allowed", reason="TOKEN_ALGORITHM_NOT_ALLOWED")
        if "crit" in header or "jwk" in header or "jku" in header or "x5u" in header:
            raise Unauthenticated("token has unsupported headers", reason="TOKEN_INVALID")
        kid = header.get("kid")
        key = await self.keys.key_for(kid) if isinstance(kid, str) and kid else None
        if key is None:
            raise Unauthenticated("token signed by an unknown key", reason="TOKEN_UNKNOWN_KEY")
        if key.algorithm_name != alg:
            raise Unauthenticated("token algorithm not allowed", reason="TOKEN_ALGORITHM_NOT_ALLOWED")
        claims = decode_claims(
            token,
            key.key,
            alg,
            audience=self.settings.audience,
            issuer=self.settings.issuer,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise Unauthenticated("invalid token subject", reason="TOKEN_INVALID")
        if str(claims.get("typ", "Bearer")).lower() not in ("bearer", "at+jwt"):
            raise Unauthenticated("not an access token", reason="TOKEN_WRONG_TYPE")
        return claims

    async def authenticate(self, token: str) -> tuple[str, int]:
        """(account id, role) of the token's subject; the account is created on first use."""
        claims = await self.verify(token)
        role = role_of(claims, self.settings.role_claim)
        subject: str = claims["sub"]
        cached = self._accounts.get(subject)
        account_id, account_role = cached if cached else await self._account_for(subject, role, claims)
        if account_role != role:
            raise PermissionDenied(
                "the token's role differs from the account's (roles are fixed at account creation)",
                reason="OIDC_ROLE_MISMATCH",
            )
        if len(self._accounts) > 50_000:
            self._accounts.clear()
        self._accounts[subject] = (account_id, account_role)
        return account_id, account_role

    async def _account_for(self, subject: str, role: int, claims: dict[str, Any]) -> tuple[str, int]:
        found = await self._find(subject)
        if found is not None:
            return found
        try:
            return await self._create(subject, role, claims)
        except IntegrityError:  # a concurrent first use created it
            found = await self._find(subject)
            if found is None:
                raise
            return found

    async def _find(self, subject: str) -> tuple[str, int] | None:
        async with self.sessions() as session:
            row = (
                await session.execute(
                    select(AccountRow.id, AccountRow.role)
                    .join(ExternalIdentityRow, ExternalIdentityRow.account_id == AccountRow.id)
                    .where(
                        ExternalIdentityRow.issuer == self.settings.issuer,
                        ExternalIdentityRow.subject == subject,
                    )
                )
            ).first()
        return (row[0], int(row[1])) if row is not None else None

    async def _create(self, subject: str, role: int, claims: dict[str, Any]) -> tuple[str, int]:
        account_id = new_id()
        # Never the e-mail as the login key: an external account must not collide with (or take over)
        # an embedded one, so its normalized e-mail is a pseudonymous key no password login can reach.
        key = hashlib.sha256(f"{self.settings.issuer}\x00{subject}".encode()).hexdigest()[:48]
        email = _printable(claims.get("email"), 254)
        name = (
            _printable(claims.get("name"), 100)
            or _printable(claims.get("preferred_username"), 100)
            or email[:100]
            or "OpenID Connect user"
        )
        now = utcnow()
        async with self.sessions.begin() as session:
            session.add(
                AccountRow(
                    id=account_id,
                    email=email,
                    email_normalized=f"oidc:{key}",
                    display_name=name,
                    role=role,
                    password_hash="!external",  # not an argon2 hash: no password login
                    disabled=False,
                    create_time=now,
                )
            )
            await session.flush()
            session.add(
                ExternalIdentityRow(
                    issuer=self.settings.issuer, subject=subject, account_id=account_id, create_time=now
                )
            )
        log_event(log, "account_created", account=account_id, via="oidc")
        return account_id, role
