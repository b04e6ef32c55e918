"""Workflow 2: AIIDA registration (trust on first use) and claiming by the owner."""

from __future__ import annotations

import logging
import re

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import instance_pb2
from eddie_common.logging import log_event
from eddie_common.page_tokens import PageTokenCodec, page_size
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.auth import principal, require_customer
from marketplace_server.clock import utcnow
from marketplace_server.db.models import InstanceRow
from marketplace_server.errors import AlreadyExists, NotFound, PermissionDenied, Validator
from marketplace_server.ratelimit import Attempts, Limiter
from marketplace_server.resources import instance_to_proto, is_instance_id, parse_instance_name
from marketplace_server.security import (
    digests_equal,
    hash_pairing_code,
    sha256_hex,
    verify_pairing_code,
)

log = logging.getLogger(__name__)

METHOD_LIST = "ListInstances"
PAIRING_CODE = re.compile(r"^[A-Za-z0-9-]{6,64}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_IPV6 = re.compile(r"^\[[0-9A-Fa-f:.]{2,45}\]$")


def valid_address(address: str) -> bool:
    """`host:port` with a DNS name, IPv4 or bracketed IPv6 host and a port 1..65535."""
    host, sep, port = address.rpartition(":")
    # ASCII digits only: str.isdigit() also accepts characters such as '²' that int() refuses.
    if len(address) > 300 or not sep or not (port.isascii() and port.isdigit()) or len(port) > 5:
        return False
    if not 1 <= int(port) <= 65535:
        return False
    return bool(_HOSTNAME.fullmatch(host) or _IPV6.fullmatch(host))


def validate_registration(request: instance_pb2.RegisterInstanceRequest) -> None:
    v = Validator()
    v.check(
        is_instance_id(request.instance_id),
        "instance_id",
        "3 to 64 characters of [A-Za-z0-9._-], starting with a letter or digit",
    )
    v.check(valid_address(request.address), "address", "must be host:port with a port 1..65535")
    secret = request.instance_secret
    v.check(
        32 <= len(secret) <= 256 and secret.isprintable() and " " not in secret,
        "instance_secret",
        "32 to 256 printable characters without spaces",
    )
    v.check(
        bool(PAIRING_CODE.fullmatch(request.pairing_code)),
        "pairing_code",
        "6 to 64 characters of [A-Za-z0-9-]",
    )
    v.raise_if_any()


class InstanceService:
    """Registers, claims and shows AIIDA instances."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        manager: ConnectionManager,
        claim_limiter: Limiter,
        pages: PageTokenCodec,
        trust: instance_pb2.RegisterInstanceResponse,
    ) -> None:
        self.sessions = sessions
        self.manager = manager
        self.claim_limiter = claim_limiter
        self.claim_attempts = Attempts(claim_limiter)
        self.pages = pages
        # What every registration learns: the marketplace's public key and issuer.
        self.trust = trust

    def to_proto(self, row: InstanceRow) -> instance_pb2.Instance:
        message = instance_to_proto(row, self.manager.is_connected(row.instance_id))
        seen = self.manager.last_seen(row.instance_id)
        if seen is not None and seen > row.last_seen_time:
            message.last_seen_time.FromDatetime(seen)
        return message

    async def register(
        self, request: instance_pb2.RegisterInstanceRequest
    ) -> instance_pb2.RegisterInstanceResponse:
        validate_registration(request)
        try:
            row = await self._register_once(request)
        except IntegrityError:  # a concurrent first registration won: re-check the secret
            row = await self._register_once(request)
        if row.owner_id is not None:
            self.manager.ensure(row.instance_id, row.address)
        log_event(log, "instance_registered", instance=row.instance_id, address=row.address)
        response = instance_pb2.RegisterInstanceResponse(instance=self.to_proto(row))
        response.MergeFrom(self.trust)
        return response

    async def _register_once(self, request: instance_pb2.RegisterInstanceRequest) -> InstanceRow:
        now = utcnow()
        secret_hash = sha256_hex(request.instance_secret)
        async with self.sessions.begin() as session:
            row = await session.get(InstanceRow, request.instance_id, with_for_update=True)
            if row is None:
                row = InstanceRow(
                    instance_id=request.instance_id,
                    address=request.address,
                    secret_hash=secret_hash,
                    pairing_code_hash=hash_pairing_code(request.pairing_code),
                    owner_id=None,
                    register_time=now,
                    claim_time=None,
                    last_seen_time=now,
                )
                session.add(row)
                return row
            if not digests_equal(row.secret_hash, secret_hash):
                log_event(log, "instance_hijack_refused", logging.WARNING, instance=request.instance_id)
                raise PermissionDenied(
                    "this instance id is registered with another secret", reason="INSTANCE_SECRET_MISMATCH"
                )
            row.address = request.address
            row.last_seen_time = now
            if row.owner_id is None and not await verify_pairing_code(
                row.pairing_code_hash, request.pairing_code
            ):
                row.pairing_code_hash = hash_pairing_code(request.pairing_code)
            return row

    async def claim(self, request: instance_pb2.ClaimInstanceRequest, peer: str) -> instance_pb2.Instance:
        caller = require_customer()
        v = Validator()
        v.check(is_instance_id(request.instance_id), "instance_id", "not a valid instance id")
        v.check(
            bool(PAIRING_CODE.fullmatch(request.pairing_code)),
            "pairing_code",
            "6 to 64 characters of [A-Za-z0-9-]",
        )
        v.raise_if_any()
        async with self.sessions() as session:
            row = await session.get(InstanceRow, request.instance_id)
        if row is None:
            raise NotFound(f"instance {request.instance_id} not found", reason="INSTANCE_NOT_FOUND")
        limits = (f"instance:{row.instance_id}", f"peer:{peer}")
        # An attempt is taken first (concurrent guesses at several replicas all count) and given
        # back when the code is right: only wrong codes use up the limit (`ratelimit.Attempts`).
        async with self.claim_attempts.attempt(*limits, what="pairing attempts") as attempt:
            if not await verify_pairing_code(row.pairing_code_hash, request.pairing_code):
                log_event(log, "claim_refused", logging.WARNING, instance=row.instance_id, why="wrong_code")
                raise PermissionDenied("wrong pairing code", reason="INVALID_PAIRING_CODE")
            await attempt.succeeded()
        if row.owner_id == caller.account_id:  # a retry by the owner (with the right code): the claim
            return self.to_proto(row)
        if row.owner_id is not None:
            raise AlreadyExists(
                "this instance is claimed by another customer", reason="INSTANCE_ALREADY_CLAIMED"
            )
        now = utcnow()
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(InstanceRow)
                .where(InstanceRow.instance_id == row.instance_id, InstanceRow.owner_id.is_(None))
                .values(owner_id=caller.account_id, claim_time=now)
            )
            claimed = await session.get(InstanceRow, row.instance_id, populate_existing=True)
        assert claimed is not None
        if result.rowcount != 1 and claimed.owner_id != caller.account_id:  # type: ignore[attr-defined]
            raise AlreadyExists(
                "this instance is claimed by another customer", reason="INSTANCE_ALREADY_CLAIMED"
            )
        self.manager.ensure(claimed.instance_id, claimed.address)
        log_event(log, "instance_claimed", instance=claimed.instance_id, owner=caller.account_id)
        return self.to_proto(claimed)

    async def get(self, name: str) -> instance_pb2.Instance:
        instance_id = parse_instance_name(name)
        caller = principal()
        async with self.sessions() as session:
            row = await session.get(InstanceRow, instance_id)
        if row is None or row.owner_id != caller.account_id:
            raise NotFound(f"instance {instance_id} not found", reason="INSTANCE_NOT_FOUND")
        return self.to_proto(row)

    async def list(self, request: instance_pb2.ListInstancesRequest) -> instance_pb2.ListInstancesResponse:
        """The caller's instances ordered by id, one page after the token's keyset cursor."""
        caller = principal()
        limit = page_size(request.page_size)
        scope = {"owner": caller.account_id}
        cursor = self.pages.decode(request.page_token, METHOD_LIST, scope) or {}
        after = cursor.get("after", "")
        async with self.sessions() as session:
            rows = list(
                await session.scalars(
                    select(InstanceRow)
                    .where(
                        InstanceRow.owner_id == caller.account_id,
                        InstanceRow.instance_id > (after if isinstance(after, str) else ""),
                    )
                    .order_by(InstanceRow.instance_id)
                    .limit(limit + 1)
                )
            )
        rows, token = self.pages.page(rows, limit, METHOD_LIST, scope, lambda r: {"after": r.instance_id})
        return instance_pb2.ListInstancesResponse(
            instances=[self.to_proto(r) for r in rows], next_page_token=token
        )
