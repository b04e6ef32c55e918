"""Workflow 1: accounts, login, refresh-token rotation with reuse detection."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import identity_pb2
from eddie_common.logging import log_event
from eddie_common.tokens import AUDIENCE_MARKETPLACE, TokenIssuer
from marketplace_server.auth import role_name
from marketplace_server.clock import to_timestamp, utcnow
from marketplace_server.db.models import AccountRow, RefreshTokenRow
from marketplace_server.errors import AlreadyExists, Unauthenticated, Validator
from marketplace_server.login_throttle import LoginThrottle
from marketplace_server.resources import account_name, account_to_proto
from marketplace_server.security import hash_password, new_id, sha256_hex, verify_password
from marketplace_server.text import single_line

log = logging.getLogger(__name__)

_EMAIL = re.compile(
    r"^[^@\s\x00-\x1f\x7f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)+$"
)
_ROLES = (identity_pb2.ROLE_CUSTOMER, identity_pb2.ROLE_ELIGIBLE_PARTY)
_COMMON_PASSWORDS = frozenset({"password1234", "123456789012", "qwertyuiopas", "passwordpassword"})
INVALID_CREDENTIALS = "invalid e-mail or password"


def validate_new_account(request: identity_pb2.CreateAccountRequest) -> None:
    v = Validator()
    email = request.email.strip()
    v.check(bool(email), "email", "required")
    if email:
        v.check(len(email) <= 254 and bool(_EMAIL.match(email)), "email", "not a valid e-mail address")
    pw = request.password
    if not pw:
        v.add("password", "required")
    elif len(pw) < 12 or len(pw) > 256:
        v.add("password", "must be 12 to 256 characters")
    elif len(set(pw)) < 5 or pw.lower() in _COMMON_PASSWORDS:
        v.add("password", "too weak: use a longer passphrase with varied characters")
    name = request.display_name.strip()
    if not name:
        v.add("display_name", "required")
    else:
        v.check(len(name) <= 100 and single_line(name), "display_name", "1 to 100 characters on one line")
    v.check(request.role in _ROLES, "role", "must be ROLE_CUSTOMER or ROLE_ELIGIBLE_PARTY")
    v.raise_if_any()


class IdentityService:
    """Accounts and tokens. Owns its transactions."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        issuer: TokenIssuer,
        *,
        access_ttl: float,
        refresh_ttl: float,
        login_throttle: LoginThrottle,
    ) -> None:
        self.sessions = sessions
        self.issuer = issuer
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.login_throttle = login_throttle

    async def create_account(self, request: identity_pb2.CreateAccountRequest) -> identity_pb2.Account:
        validate_new_account(request)
        email = request.email.strip()
        row = AccountRow(
            id=new_id(),
            email=email,
            email_normalized=email.lower(),
            display_name=request.display_name.strip(),
            role=request.role,
            password_hash=await hash_password(request.password),
            disabled=False,
            create_time=utcnow(),
        )
        try:
            async with self.sessions.begin() as session:
                taken = await session.scalar(
                    select(AccountRow.id).where(AccountRow.email_normalized == row.email_normalized)
                )
                if taken is not None:
                    raise AlreadyExists("an account with this e-mail exists", reason="EMAIL_TAKEN")
                session.add(row)
        except IntegrityError:
            raise AlreadyExists("an account with this e-mail exists", reason="EMAIL_TAKEN") from None
        log_event(log, "account_created", account=row.id, role=role_name(row.role))
        return account_to_proto(row)

    async def get_account(self, account_id: str) -> identity_pb2.Account:
        async with self.sessions() as session:
            row = await session.get(AccountRow, account_id)
        if row is None or row.disabled:
            raise Unauthenticated("the account no longer exists or is disabled", reason="ACCOUNT_DISABLED")
        return account_to_proto(row)

    async def login(self, email: str, password: str, peer: str) -> identity_pb2.Token:
        normalized = email.strip().lower()[:254]
        throttle = self.login_throttle
        async with throttle.attempt(peer) as attempt:
            if (delay := await throttle.delay(normalized)) > 0:
                await asyncio.sleep(delay)
            row: AccountRow | None = None
            if "\x00" not in normalized:  # no account has one, and PostgreSQL refuses NUL in text
                async with self.sessions() as session:
                    row = await session.scalar(
                        select(AccountRow).where(AccountRow.email_normalized == normalized)
                    )
            ok = await verify_password(row.password_hash if row else None, password[:1024])
            if row is None or not ok or row.disabled:
                await throttle.record_failure(normalized)
                log_event(log, "login_failed", logging.WARNING, peer=peer)
                raise Unauthenticated(INVALID_CREDENTIALS, reason="INVALID_CREDENTIALS")
            await throttle.record_success(attempt, normalized)
        async with self.sessions.begin() as session:
            tokens = self._issue(session, row, family_id=new_id())
        log_event(log, "login", account=row.id)
        return tokens

    async def refresh(self, refresh_token: str) -> identity_pb2.Token:
        if not refresh_token or len(refresh_token) > 512:
            raise Unauthenticated("invalid refresh token", reason="REFRESH_TOKEN_INVALID")
        digest = sha256_hex(refresh_token)
        async with self.sessions.begin() as session:
            row = await session.get(RefreshTokenRow, digest)
            if row is None or row.revoked:
                raise Unauthenticated("invalid refresh token", reason="REFRESH_TOKEN_INVALID")
            spent = await session.execute(
                update(RefreshTokenRow)
                .where(RefreshTokenRow.token_hash == digest, RefreshTokenRow.used.is_(False))
                .values(used=True)
            )
            if spent.rowcount != 1:  # type: ignore[attr-defined]
                await self._revoke_family(session, row.family_id)
                reuse = True
            else:
                reuse = False
                if row.expire_time <= utcnow():
                    raise Unauthenticated("refresh token expired", reason="REFRESH_TOKEN_EXPIRED")
                account = await session.get(AccountRow, row.account_id)
                if account is None or account.disabled:
                    raise Unauthenticated("the account is disabled", reason="ACCOUNT_DISABLED")
                tokens = self._issue(session, account, family_id=row.family_id)
        if reuse:
            log_event(log, "refresh_token_reused", logging.WARNING, family=row.family_id)
            raise Unauthenticated(
                "refresh token already used; all sessions of this login are revoked",
                reason="REFRESH_TOKEN_REUSED",
            )
        return tokens

    async def _revoke_family(self, session: AsyncSession, family_id: str) -> None:
        await session.execute(
            update(RefreshTokenRow).where(RefreshTokenRow.family_id == family_id).values(revoked=True)
        )

    def _issue(self, session: AsyncSession, account: AccountRow, family_id: str) -> identity_pb2.Token:
        access, access_exp = self.issuer.issue(
            account_name(account.id),
            AUDIENCE_MARKETPLACE,
            self.access_ttl,
            role=role_name(account.role),
            typ="access",
        )
        refresh = "rt_" + secrets.token_urlsafe(32)
        now = utcnow()
        expire = now + timedelta(seconds=self.refresh_ttl)
        session.add(
            RefreshTokenRow(
                token_hash=sha256_hex(refresh),
                family_id=family_id,
                account_id=account.id,
                create_time=now,
                expire_time=expire,
                used=False,
                revoked=False,
            )
        )
        return identity_pb2.Token(
            access_token=access,
            refresh_token=refresh,
            expire_time=to_timestamp(datetime.fromtimestamp(access_exp, UTC)),
            refresh_expire_time=to_timestamp(expire),
            account=account_to_proto(account),
        )
