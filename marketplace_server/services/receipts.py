"""Consent receipts (GDPR Art. 7(1): consent must be demonstrable).

Every approval, rejection and revocation writes one receipt in the same
transaction as the decision: a compact JWS (ES256, `kid` of the marketplace's
current key) over a JSON object modelled on the Kantara Consent Receipt and the
ISO/IEC 29184 notice fields (who decided what, for whom, for which purpose and
policy, when). A customer's receipts form one hash chain: `sequence` counts them
from 1 and `previous_hash` is the lowercase hex SHA-256 of the previous
receipt's `jws`, so a removed, altered or reordered receipt is detectable
offline with the keys of `ListSigningKeys` (see `eddie_client.receipts`).

The chain cannot fork: the next sequence number comes from the customer's
counter row, an atomic upsert that holds the row lock (PostgreSQL) or the write
lock (SQLite) until the decision commits, so two decisions of one customer at
once are serialized and the second reads the first's receipt as its previous.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from jwt.api_jws import PyJWS
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import consent_pb2
from eddie_common.page_tokens import PageTokenCodec, page_size
from eddie_common.tokens import ALGORITHM, SigningKey
from marketplace_server.auth import principal, require_customer
from marketplace_server.clock import utcnow
from marketplace_server.db.counters import next_value
from marketplace_server.db.models import ConsentReceiptRow, DataRequestRow, PermissionRow
from marketplace_server.errors import NotFound
from marketplace_server.resources import (
    account_name,
    data_request_name,
    instance_name,
    parse_permission_name,
    permission_name,
)
from marketplace_server.security import new_id, sha256_hex

__all__ = [
    "APPROVE",
    "RECEIPT_TYPE",
    "RECEIPT_VERSION",
    "REJECT",
    "REVOKE",
    "ReceiptService",
    "ReceiptSigner",
    "write_receipt",
]

APPROVE = "approve"
REJECT = "reject"
REVOKE = "revoke"
RECEIPT_VERSION = "eddie-consent-receipt/1"
RECEIPT_TYPE = "consent-receipt+jws"
METHOD_LIST = "ListConsentReceipts"
_COUNTER_PREFIX = "receipts:"
_COUNTER_NAME_MAX = 32


@dataclass
class ReceiptSigner:
    """Signs receipts with the marketplace's current key (`key` follows the ring's rotations)."""

    key: SigningKey
    issuer: str

    def sign(self, claims: dict[str, Any]) -> str:
        payload = json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        return PyJWS().encode(
            payload,
            self.key.private_key,
            algorithm=ALGORITHM,
            headers={"kid": self.key.key_id, "typ": RECEIPT_TYPE},
        )


def _counter_name(customer_id: str) -> str:
    name = _COUNTER_PREFIX + customer_id
    if len(name) <= _COUNTER_NAME_MAX:
        return name
    return _COUNTER_PREFIX + sha256_hex(customer_id)[: _COUNTER_NAME_MAX - len(_COUNTER_PREFIX)]


def rfc3339(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


async def _previous_hash(session: AsyncSession, customer_id: str, sequence: int) -> str:
    if sequence == 1:
        return ""
    previous = await session.scalar(
        select(ConsentReceiptRow.jws).where(
            ConsentReceiptRow.customer_id == customer_id, ConsentReceiptRow.sequence == sequence - 1
        )
    )
    if previous is None:  # the counter and the receipts are written together; this is a broken invariant
        raise RuntimeError(f"consent receipt chain of {customer_id} has no receipt {sequence - 1}")
    return hashlib.sha256(previous.encode()).hexdigest()


async def write_receipt(
    session: AsyncSession,
    signer: ReceiptSigner,
    permission: PermissionRow,
    decision: str,
    reason: str,
    now: datetime | None = None,
) -> ConsentReceiptRow:
    """Appends a receipt of `decision` on `permission` to its customer's chain, in `session`'s transaction.

    Callers: DecideAccess / Connect decisions (approve, reject), RevokePermission and account
    deletion (revoke). The transaction must also hold the decision itself.
    """
    data_request = await session.get(DataRequestRow, permission.data_request_id)
    if data_request is None:
        raise RuntimeError(f"permission {permission.id} names an unknown data request")
    sequence = await next_value(session, _counter_name(permission.customer_id))
    receipt_id = new_id()
    when = now or utcnow()
    claims: dict[str, Any] = {
        "version": RECEIPT_VERSION,
        "issuer": signer.issuer,
        "receipt_id": receipt_id,
        "sequence": sequence,
        "previous_hash": await _previous_hash(session, permission.customer_id, sequence),
        "permission": permission_name(permission.id),
        "instance": instance_name(permission.instance_id),
        "customer": account_name(permission.customer_id),
        "eligible_party": account_name(permission.eligible_party_id),
        "data_request": data_request_name(data_request.id),
        "purpose": data_request.purpose,
        "policy_uri": data_request.policy_uri,
        "data_need": json_format.MessageToDict(energy_pb2.DataNeed.FromString(data_request.data_need)),
        "decision": decision,
        "reason": reason,
        "time": rfc3339(when),
    }
    row = ConsentReceiptRow(
        id=receipt_id,
        customer_id=permission.customer_id,
        sequence=sequence,
        permission_id=permission.id,
        decision=decision,
        jws=signer.sign(claims),
        create_time=when,
    )
    session.add(row)
    return row


def receipt_to_proto(row: ConsentReceiptRow) -> consent_pb2.ConsentReceipt:
    return consent_pb2.ConsentReceipt(
        permission=permission_name(row.permission_id), sequence=row.sequence, jws=row.jws
    )


def receipt_not_found(permission_id: str) -> NotFound:
    return NotFound(f"no consent receipt for permissions/{permission_id}", reason="CONSENT_RECEIPT_NOT_FOUND")


class ReceiptService:
    """ListConsentReceipts and GetConsentReceipt; `signer` writes receipts for the decision paths."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], signer: ReceiptSigner, pages: PageTokenCodec
    ) -> None:
        self.sessions = sessions
        self.signer = signer
        self.pages = pages

    async def list_receipts(
        self, request: consent_pb2.ListConsentReceiptsRequest
    ) -> consent_pb2.ListConsentReceiptsResponse:
        caller = require_customer().account_id
        size = page_size(request.page_size)
        bound = {"account": caller}
        after = self.pages.decode_int(request.page_token, METHOD_LIST, bound, "sequence") or 0
        async with self.sessions() as session:
            rows = list(
                await session.scalars(
                    select(ConsentReceiptRow)
                    .where(ConsentReceiptRow.customer_id == caller, ConsentReceiptRow.sequence > after)
                    .order_by(ConsentReceiptRow.sequence)
                    .limit(size + 1)
                )
            )
        rows, token = self.pages.page(rows, size, METHOD_LIST, bound, lambda r: {"sequence": r.sequence})
        return consent_pb2.ListConsentReceiptsResponse(
            consent_receipts=[receipt_to_proto(r) for r in rows], next_page_token=token
        )

    async def get_receipt(self, request: consent_pb2.GetConsentReceiptRequest) -> consent_pb2.ConsentReceipt:
        """The latest receipt of a permission, for its customer or its eligible party."""
        caller = principal().account_id
        permission_id = parse_permission_name(request.permission, "permission")
        async with self.sessions() as session:
            parties = (
                await session.execute(
                    select(PermissionRow.customer_id, PermissionRow.eligible_party_id).where(
                        PermissionRow.id == permission_id
                    )
                )
            ).first()
            if parties is None or caller not in tuple(parties):
                raise receipt_not_found(permission_id)
            row = await session.scalar(
                select(ConsentReceiptRow)
                .where(ConsentReceiptRow.permission_id == permission_id)
                .order_by(ConsentReceiptRow.sequence.desc())
                .limit(1)
            )
        if row is None:
            raise receipt_not_found(permission_id)
        return receipt_to_proto(row)
