"""Forged JWTs, signed with the marketplace's own key so that only the rule under test rejects them."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from eddie_common import tokens
from tests.support.token_programs import INSTANCE, PERMISSION, Programs

# --- forging -------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def sign_raw(header: dict[str, Any], claims: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    """A JWS built by hand (for what PyJWT refuses to build), with a valid ES256 signature."""
    signing_input = f"{b64url(compact_json(header))}.{b64url(compact_json(claims))}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def base_claims(p: Programs, target: str) -> dict[str, Any]:
    """Claims the target accepts, exactly as the marketplace issues them for it."""
    now = int(time.time())
    common: dict[str, Any] = {
        "iss": p.issuer,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": secrets.token_urlsafe(12),
    }
    if target == "marketplace":
        return {
            **common,
            "sub": p.customer_name,
            "aud": "marketplace",
            "role": "ROLE_CUSTOMER",
            "typ": "access",
        }
    if target == "aiida":
        return {**common, "sub": f"instances/{INSTANCE}", "aud": "aiida"}
    if target == "sink-publish":
        return {
            **common,
            "sub": f"permissions/{PERMISSION}",
            "aud": "eddie-sink",
            "permission_id": PERMISSION,
            "eligible_party": p.ep_name,
            "instance_id": INSTANCE,
        }
    assert target == "sink-list"
    return {**common, "sub": p.ep_name, "aud": "marketplace", "role": "ROLE_ELIGIBLE_PARTY", "typ": "access"}


Mutation = Callable[[dict[str, Any]], dict[str, Any]]


def unchanged(claims: dict[str, Any]) -> dict[str, Any]:
    return claims


def without(name: str) -> Mutation:
    return lambda claims: {k: v for k, v in claims.items() if k != name}


def shifted(**seconds: int) -> Mutation:
    """Moves time claims relative to now, e.g. shifted(nbf=300) is "valid from in five minutes"."""
    return lambda claims: {**claims, **{k: int(time.time()) + v for k, v in seconds.items()}}


def replaced(**values: Any) -> Mutation:
    return lambda claims: {**claims, **values}


@dataclass(frozen=True)
class Forgery:
    """A token that differs from an accepted one in one respect."""

    reason: str | None  # the ErrorInfo reason; None: accepted (a control row)
    claims: Mutation = unchanged
    header: dict[str, Any] = field(default_factory=dict)
    drop_kid: bool = False
    raw: bool = False  # sign by hand: PyJWT would refuse or rewrite this header
    other_key: bool = False  # signed with a key that is not the marketplace's, whatever the header says
    message: str | None = None  # the status message, where it proves which check refused

    def token(self, p: Programs, target: str) -> str:
        claims = self.claims(base_claims(p, target))
        private = tokens.SigningKey.generate().private_key if self.other_key else p.key.private_key
        header: dict[str, Any] = {"alg": "ES256", "typ": "JWT", "kid": p.key.key_id, **self.header}
        if self.drop_kid:
            del header["kid"]
        if self.raw:
            return sign_raw(header, claims, private)
        return jwt.encode(claims, private, algorithm="ES256", headers=header)


def _attacker_jwk() -> dict[str, Any]:
    public = tokens.SigningKey.generate().public_key
    jwk: dict[str, Any] = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    return jwk


FORGERIES = [
    pytest.param(Forgery(None), id="control-as-issued"),
    # RFC 8725 §3.1 / §2.6: the key is chosen by a known `kid` only; nothing in the token supplies one.
    pytest.param(Forgery("TOKEN_UNKNOWN_KEY", header={"kid": "no-such-key-id"}), id="kid-unknown"),
    pytest.param(Forgery("TOKEN_UNKNOWN_KEY", drop_kid=True), id="kid-missing"),
    pytest.param(Forgery("TOKEN_INVALID", header={"kid": 5}, raw=True), id="kid-not-a-string"),
    pytest.param(
        Forgery("TOKEN_UNKNOWN_KEY", header={"kid": "../../marketplace/signing-key.pem"}), id="kid-a-path"
    ),
    pytest.param(
        Forgery("TOKEN_INVALID", header={"jwk": _attacker_jwk()}, other_key=True),
        id="embedded-jwk-of-the-signing-attacker",
    ),
    # RFC 7515 §4.1.11: critical extensions the verifier does not understand must be refused.
    pytest.param(Forgery("TOKEN_INVALID", header={"crit": ["exp"]}), id="crit-exp"),
    pytest.param(
        Forgery("TOKEN_INVALID", header={"crit": ["x-foo"], "x-foo": 1}), id="crit-unknown-extension"
    ),
    pytest.param(Forgery("TOKEN_INVALID", header={"crit": []}, raw=True), id="crit-empty"),
    # PyJWT itself understands `b64` (RFC 7797) and would go on; TokenVerifier refuses any `crit`.
    pytest.param(
        Forgery(
            "TOKEN_INVALID",
            header={"b64": True, "crit": ["b64"]},
            raw=True,
            message="token has unsupported critical headers",
        ),
        id="crit-b64-understood-by-pyjwt",
    ),
    # RFC 7519 §4.1.5 / §4.1.6 with the verifier's documented leeway (tokens.LEEWAY_SECONDS).
    pytest.param(Forgery("TOKEN_NOT_YET_VALID", claims=shifted(nbf=300)), id="nbf-in-five-minutes"),
    pytest.param(
        Forgery("TOKEN_NOT_YET_VALID", claims=shifted(nbf=int(tokens.LEEWAY_SECONDS) + 15)),
        id="nbf-just-past-the-leeway",
    ),
    pytest.param(Forgery(None, claims=shifted(nbf=int(tokens.LEEWAY_SECONDS) - 20)), id="nbf-within-leeway"),
    pytest.param(Forgery("TOKEN_NOT_YET_VALID", claims=shifted(iat=3600)), id="iat-in-an-hour"),
    # RFC 8725 §3.8, §3.9: issuer and audience are required and checked, as are exp, sub, iat, jti.
    pytest.param(Forgery("TOKEN_INVALID", claims=without("exp")), id="no-exp"),
    pytest.param(Forgery("TOKEN_INVALID", claims=without("sub")), id="no-sub"),
    pytest.param(Forgery("TOKEN_INVALID", claims=without("aud")), id="no-aud"),
    pytest.param(Forgery("TOKEN_INVALID", claims=without("iss")), id="no-iss"),
    pytest.param(Forgery("TOKEN_INVALID", claims=without("iat")), id="no-iat"),
    pytest.param(Forgery("TOKEN_INVALID", claims=without("jti")), id="no-jti"),
    pytest.param(Forgery("TOKEN_WRONG_ISSUER", claims=replaced(iss="evil-marketplace")), id="wrong-iss"),
    pytest.param(Forgery("TOKEN_WRONG_ISSUER", claims=replaced(iss="")), id="empty-iss"),
    pytest.param(Forgery("TOKEN_INVALID", claims=replaced(sub=42)), id="sub-not-a-string"),
    pytest.param(Forgery("TOKEN_INVALID", claims=replaced(exp="tomorrow")), id="exp-not-a-number"),
    pytest.param(Forgery("TOKEN_INVALID", claims=replaced(aud="")), id="empty-aud"),
]
