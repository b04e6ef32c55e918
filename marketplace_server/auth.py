"""Who is calling: access-token verification and the caller in a context variable.

The interceptor authenticates; role checks live in the service layer
(`require_customer`, `require_eligible_party`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import identity_pb2
from eddie_common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from eddie_common.interceptors import caller_as
from eddie_common.tokens import AUDIENCE_MARKETPLACE, TokenVerifier, bearer_token
from marketplace_server.db import models
from marketplace_server.keyring import LiveKeys
from marketplace_server.oidc import OidcAuthenticator, unverified_issuer
from marketplace_server.resources import account_name, parse_account_name

PUBLIC_METHODS = frozenset(
    {
        "/eddie.marketplace.v1.IdentityService/CreateAccount",
        "/eddie.marketplace.v1.IdentityService/CreateToken",
        "/eddie.marketplace.v1.IdentityService/RefreshToken",
        "/eddie.marketplace.v1.IdentityService/ListSigningKeys",
        "/eddie.marketplace.v1.InstanceService/RegisterInstance",
        # Each subscription is proven by a permission's sink token (services.sink_feed).
        "/eddie.marketplace.v1.SinkFeedService/WatchPermissionEnds",
    }
)

ROLE_CUSTOMER = identity_pb2.ROLE_CUSTOMER
ROLE_ELIGIBLE_PARTY = identity_pb2.ROLE_ELIGIBLE_PARTY


def role_name(role: int) -> str:
    return identity_pb2.Role.Name(identity_pb2.Role.ValueType(role))


@dataclass(frozen=True)
class Principal:
    """The authenticated account of the current RPC."""

    account_id: str
    role: int

    @property
    def name(self) -> str:
        return account_name(self.account_id)

    @property
    def is_customer(self) -> bool:
        return self.role == ROLE_CUSTOMER

    @property
    def is_eligible_party(self) -> bool:
        return self.role == ROLE_ELIGIBLE_PARTY


def principal() -> Principal:
    """The caller of the current RPC (set by the interceptor)."""
    value = caller_as(Principal)
    if value is None:
        raise Unauthenticated("authentication required", reason="UNAUTHENTICATED")
    return value


def require_customer() -> Principal:
    p = principal()
    if not p.is_customer:
        raise PermissionDenied("only customers may do this", reason="ROLE_NOT_ALLOWED")
    return p


def require_eligible_party() -> Principal:
    p = principal()
    if not p.is_eligible_party:
        raise PermissionDenied("only eligible parties may do this", reason="ROLE_NOT_ALLOWED")
    return p


class AccessTokenAuthenticator:
    """Verifies the bearer access token and that its account still exists and is enabled."""

    _CACHE_SECONDS = 2.0
    _DENIED_SECONDS = 60.0  # far beyond the cache's window and any read in flight

    def __init__(
        self,
        verifier: TokenVerifier,
        sessions: async_sessionmaker[AsyncSession],
        external: OidcAuthenticator | None = None,
        keys: LiveKeys | None = None,
    ) -> None:
        self.verifier = verifier
        # The ring the verifier follows: a token naming a key not (yet) in it re-reads the ring once.
        self.keys = keys
        self.sessions = sessions
        # Tokens of an external OpenID Connect provider (--oidc-issuer), routed by their `iss`.
        self.external = external
        self._accounts: dict[str, tuple[float, int | None]] = {}
        # Deleted here (or announced by another replica): refused without the cache's window. Kept
        # while a cached or in-flight read could still say otherwise, then the database says it.
        self._denied: dict[str, float] = {}

    def forget(self, account_id: str) -> None:
        self._accounts.pop(account_id, None)

    def deny(self, account_id: str) -> None:
        """The account was deleted: its tokens are refused from now on."""
        now = time.monotonic()
        if len(self._denied) > 10_000:
            horizon = now - self._DENIED_SECONDS
            self._denied = {a: t for a, t in self._denied.items() if t > horizon}
        self._denied[account_id] = now
        self._accounts[account_id] = (now, None)

    async def _account_role(self, account_id: str) -> int | None:
        if account_id in self._denied:
            return None
        now = time.monotonic()
        cached = self._accounts.get(account_id)
        if cached and now - cached[0] < self._CACHE_SECONDS:
            return cached[1]
        async with self.sessions() as session:
            row = await session.get(models.AccountRow, account_id)
        role = row.role if row is not None and not row.disabled else None
        if len(self._accounts) > 50_000:
            self._accounts.clear()
        self._accounts[account_id] = (now, role)
        return role

    async def __call__(self, method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> Principal:
        token = bearer_token(metadata)
        if not token:
            raise Unauthenticated("missing authorization: Bearer <access token>", reason="TOKEN_MISSING")
        if self.external is not None and unverified_issuer(token) == self.external.settings.issuer:
            return await self._external_principal(token)
        claims = await self.keys.verify(self.verifier, token) if self.keys else self.verifier.verify(token)
        if claims.get("typ") != "access":
            raise Unauthenticated("not an access token", reason="TOKEN_WRONG_TYPE")
        try:
            account_id = parse_account_name(str(claims["sub"]))
        except InvalidArgument:
            raise Unauthenticated("invalid token subject", reason="TOKEN_INVALID") from None
        role = await self._account_role(account_id)
        if role is None:
            raise Unauthenticated("the account no longer exists or is disabled", reason="ACCOUNT_DISABLED")
        if claims.get("role") != role_name(role):
            raise Unauthenticated("invalid token role", reason="TOKEN_INVALID")
        return Principal(account_id=account_id, role=role)

    async def _external_principal(self, token: str) -> Principal:
        assert self.external is not None
        account_id, token_role = await self.external.authenticate(token)
        role = await self._account_role(account_id)
        if role is None:
            raise Unauthenticated("the account no longer exists or is disabled", reason="ACCOUNT_DISABLED")
        if role != token_role:
            raise PermissionDenied(
                "the token's role differs from the account's (roles are fixed at account creation)",
                reason="OIDC_ROLE_MISMATCH",
            )
        return Principal(account_id=account_id, role=role)


def marketplace_verifier(public_keys: dict[str, object], issuer: str) -> TokenVerifier:
    return TokenVerifier(public_keys, issuer=issuer, audience=AUDIENCE_MARKETPLACE)  # type: ignore[arg-type]
