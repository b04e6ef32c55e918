"""Offline verification of a customer's consent receipts.

A receipt is a compact JWS (ES256) whose header names the signing key (`kid`);
the keys come from the marketplace's public `IdentityService.ListSigningKeys`
(current and earlier keys, so receipts signed before a key rotation still
verify). A customer's receipts form one hash chain: receipt n has `sequence` n
and `previous_hash` = lowercase hex SHA-256 of receipt n-1's `jws` ("" for the
first). `verify_chain` checks every signature and every link, so an altered,
removed (inside the chain) or reordered receipt is reported. A chain cut off at
its end cannot be told from a shorter one by the chain alone: compare the last
`sequence` with one you kept (or with a receipt you were given earlier).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.api_jws import PyJWS

from eddie.marketplace.v1 import consent_pb2, identity_pb2, identity_pb2_grpc
from eddie_common.tokens import ALGORITHM, load_public_key

__all__ = [
    "ReceiptError",
    "VerifiedReceipt",
    "chain_summary",
    "fetch_signing_keys",
    "receipt_hash",
    "signing_keys",
    "verify_chain",
    "verify_receipt",
]

REQUIRED_FIELDS = (
    "receipt_id",
    "sequence",
    "previous_hash",
    "permission",
    "customer",
    "eligible_party",
    "data_request",
    "purpose",
    "policy_uri",
    "data_need",
    "decision",
    "reason",
    "time",
)
DECISIONS = frozenset({"approve", "reject", "revoke"})

PublicKeys = Mapping[str, ec.EllipticCurvePublicKey]


class ReceiptError(Exception):
    """A receipt that does not verify, or a break in the chain; `position` counts from 1."""

    def __init__(self, position: int, problem: str) -> None:
        super().__init__(f"receipt {position}: {problem}")
        self.position = position
        self.problem = problem


@dataclass(frozen=True)
class VerifiedReceipt:
    """A receipt whose signature verified, with its claims and its key."""

    jws: str
    key_id: str
    claims: dict[str, Any]

    @property
    def sequence(self) -> int:
        return int(self.claims["sequence"])

    @property
    def decision(self) -> str:
        return str(self.claims["decision"])

    @property
    def permission(self) -> str:
        return str(self.claims["permission"])


def receipt_hash(jws: str) -> str:
    """What the next receipt's `previous_hash` must be."""
    return hashlib.sha256(jws.encode()).hexdigest()


def signing_keys(response: identity_pb2.ListSigningKeysResponse) -> dict[str, ec.EllipticCurvePublicKey]:
    """The ES256 keys of a ListSigningKeys response, by `kid`."""
    return {
        k.key_id: load_public_key(k.public_key_pem) for k in response.signing_keys if k.algorithm == ALGORITHM
    }


async def fetch_signing_keys(
    stub: identity_pb2_grpc.IdentityServiceStub, timeout: float = 10.0
) -> dict[str, ec.EllipticCurvePublicKey]:
    """The marketplace's public keys (ListSigningKeys needs no token)."""
    response: identity_pb2.ListSigningKeysResponse = await stub.ListSigningKeys(  # type: ignore[misc]
        identity_pb2.ListSigningKeysRequest(), timeout=timeout
    )
    return signing_keys(response)


def verify_receipt(jws: str, keys: PublicKeys, position: int = 1) -> VerifiedReceipt:
    """Checks one receipt's signature (ES256 only, key by `kid`) and the shape of its claims."""
    try:
        header = jwt.get_unverified_header(jws)
    except jwt.PyJWTError:
        raise ReceiptError(position, "not a compact JWS") from None
    if header.get("alg") != ALGORITHM:
        raise ReceiptError(position, f"algorithm {header.get('alg')!r} is not {ALGORITHM}")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise ReceiptError(position, f"signed by an unknown key {kid!r}")
    try:
        payload = PyJWS().decode(jws, key, algorithms=[ALGORITHM])
        claims = json.loads(payload)
    except (jwt.PyJWTError, ValueError):
        raise ReceiptError(position, "the signature does not verify") from None
    if not isinstance(claims, dict):
        raise ReceiptError(position, "the payload is not a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in claims]
    if missing:
        raise ReceiptError(position, f"missing fields {missing}")
    if not isinstance(claims["sequence"], int) or claims["decision"] not in DECISIONS:
        raise ReceiptError(position, "bad sequence or decision")
    return VerifiedReceipt(jws, kid, claims)  # type: ignore[arg-type]


def verify_chain(
    receipts: Iterable[str | consent_pb2.ConsentReceipt], keys: PublicKeys
) -> list[VerifiedReceipt]:
    """Verifies a customer's whole chain, oldest first; raises ReceiptError at the first break."""
    verified: list[VerifiedReceipt] = []
    previous_hash = ""
    customer = None
    for position, item in enumerate(receipts, start=1):
        jws = item if isinstance(item, str) else item.jws
        receipt = verify_receipt(jws, keys, position)
        _check_link(receipt, position, previous_hash, customer)
        if isinstance(item, consent_pb2.ConsentReceipt):
            _check_envelope(item, receipt, position)
        customer = receipt.claims["customer"]
        previous_hash = receipt_hash(jws)
        verified.append(receipt)
    return verified


def _check_link(receipt: VerifiedReceipt, position: int, previous_hash: str, customer: object) -> None:
    if receipt.sequence != position:
        raise ReceiptError(position, f"sequence {receipt.sequence} where {position} was expected")
    if receipt.claims["previous_hash"] != previous_hash:
        raise ReceiptError(position, "previous_hash does not match the previous receipt")
    if customer is not None and receipt.claims["customer"] != customer:
        raise ReceiptError(position, "a receipt of another customer")


def _check_envelope(item: consent_pb2.ConsentReceipt, receipt: VerifiedReceipt, position: int) -> None:
    """The unsigned fields of the message must say what the signed claims say."""
    if item.sequence != receipt.sequence or item.permission != receipt.permission:
        raise ReceiptError(position, "the message's sequence or permission differs from the signed one")


def chain_summary(receipts: Sequence[VerifiedReceipt]) -> list[str]:
    """One line per receipt, for people."""
    return [
        f"#{r.sequence} {r.claims['time']} {r.decision:<7} {r.permission} ({r.claims['purpose']})"
        for r in receipts
    ]
