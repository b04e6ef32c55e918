"""Marketplace-signed JWTs: the signing key, issuing, and strict verification (RFC 8725).

Three kinds of token share one ES256 key and differ by audience:

| audience      | subject                      | used for                                   |
|---------------|------------------------------|--------------------------------------------|
| `marketplace` | `accounts/{id}`              | access tokens of customers and EPs         |
| `aiida`       | `instances/{instance_id}`    | the marketplace's calls to one AIIDA       |
| `eddie-sink`  | `permissions/{id}`           | an AIIDA publishing one permission's data  |

Verification pins the algorithm (ES256; `none` and HMAC are refused before any
key is touched), requires a known `kid`, refuses `crit` headers, and checks
`iss`, `aud`, `exp`, `nbf` and `iat` with a small leeway.

These tokens are issued and verified without PyJWT: a marketplace restart costs
one issue and one verification per AIIDA stream, and PyJWT's pure-Python
parsing (a generator over every base64url character, the header parsed twice,
segments re-encoded) cost as much again as the ECDSA operation itself. The strict
compact-JWS path here accepts exactly what `jwt.decode` with the same options
accepts, with the same reasons, except for two deliberate refusals PyJWT does
not make: `=` padding (RFC 7515 §2: base64url without padding) and `exp`,
`nbf`, `iat` that are not JSON numbers (RFC 7519 §2 NumericDate; PyJWT takes
whatever `int()` takes, `true` and `"1_700_000_000"` included). The crypto is
`cryptography`'s. `decode_claims` stays on PyJWT for the external identity
provider's RS256 tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from jwt.types import Options

from eddie_common.errors import Unauthenticated

ALGORITHM = "ES256"
AUDIENCE_MARKETPLACE = "marketplace"
AUDIENCE_AIIDA = "aiida"
AUDIENCE_SINK = "eddie-sink"
DEFAULT_ISSUER = "eddie-marketplace"
MAX_TOKEN_LENGTH = 8192
LEEWAY_SECONDS = 30
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "jti")

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_COORDINATE_BYTES = 32  # P-256: r and s of a JWS signature are 32 bytes each (RFC 7518 §3.4)
_JSON = json.JSONEncoder(separators=(",", ":"))  # what PyJWT emits, without a new encoder per token


# --- base64url (RFC 7515 §2: the URL-safe alphabet, no padding) ---

_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")
# The last character of a segment of length 4n+2 (4n+3) carries 4 (2) unused bits, which must be
# zero: otherwise several spellings decode to the same bytes (PyJWT refuses them by re-encoding).
_CANONICAL_LAST: tuple[frozenset[int], ...] = (
    frozenset(),
    frozenset(),
    frozenset(b"AQgw"),
    frozenset(b"AEIMQUYcgkosw048"),
)
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_PADDING = (b"", b"", b"==", b"=")


def _b64url_encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _is_b64url(segment: bytes) -> bool:
    """Whether `segment` is canonical unpadded base64url (a C-speed match, then the last character)."""
    rem = len(segment) % 4
    return (
        rem != 1
        and _BASE64URL.fullmatch(segment) is not None
        and (rem == 0 or segment[-1] in _CANONICAL_LAST[rem])
    )


def _b64url_decode(segment: bytes) -> bytes:
    """The bytes of a segment `_is_b64url` accepted."""
    return binascii.a2b_base64(segment.translate(_FROM_URLSAFE) + _PADDING[len(segment) % 4])


def key_id_of(public_key: ec.EllipticCurvePublicKey) -> str:
    """A stable `kid`: base64url of the SHA-256 of the DER public key, 22 characters."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode()[:22]


def public_key_pem(public_key: ec.EllipticCurvePublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not a P-256 public key")
    return key


@dataclass(frozen=True)
class SigningKey:
    """The private key tokens are signed with, and its `kid`."""

    private_key: ec.EllipticCurvePrivateKey
    key_id: str

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    @property
    def public_pem(self) -> str:
        return public_key_pem(self.public_key)

    @classmethod
    def generate(cls) -> SigningKey:
        private = ec.generate_private_key(ec.SECP256R1())
        return cls(private, key_id_of(private.public_key()))

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """Loads the PEM key at `path`, creating it (mode 0600) on first start."""
        if path.exists():
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path} is not an EC private key")
            return cls(private, key_id_of(private.public_key()))
        key = cls.generate()
        pem = key.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)
        return key


class TokenIssuer:
    """Signs tokens with the marketplace key.

    The tokens are byte for byte what `jwt.encode(payload, key, "ES256", headers={"kid": ...})`
    makes: a sorted compact header `{"alg":"ES256","kid":...,"typ":"JWT"}`, the compact JSON payload,
    and r||s. The header segment depends on the key only, so it is encoded once per key (`key` is
    replaced in place on rotation).
    """

    def __init__(self, key: SigningKey, issuer: str = DEFAULT_ISSUER) -> None:
        self.key = key
        self.issuer = issuer

    @property
    def key(self) -> SigningKey:
        return self._key

    @key.setter
    def key(self, key: SigningKey) -> None:
        header = json.dumps({"alg": ALGORITHM, "kid": key.key_id, "typ": "JWT"}, separators=(",", ":"))
        self._header_segment = _b64url_encode(header.encode()) + b"."
        # PyJWT refuses other curves for ES256 when signing; so does `issue`.
        self._p256 = isinstance(key.private_key.curve, ec.SECP256R1)
        self._key = key

    def issue(self, subject: str, audience: str, ttl_seconds: float, **claims: Any) -> tuple[str, float]:
        """Returns the token and its expiry (epoch seconds)."""
        now = time.time()
        exp = now + ttl_seconds
        payload = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(exp),
            "jti": secrets.token_urlsafe(12),
            **claims,
        }
        if not isinstance(payload["iss"], str):
            raise TypeError("Issuer (iss) must be a string.")
        if not self._p256:
            raise ValueError("ES256 tokens need a P-256 key")
        signing_input = self._header_segment + _b64url_encode(_JSON.encode(payload).encode())
        r, s = decode_dss_signature(self._key.private_key.sign(signing_input, _ECDSA_SHA256))
        signature = r.to_bytes(_COORDINATE_BYTES, "big") + s.to_bytes(_COORDINATE_BYTES, "big")
        token = signing_input + b"." + _b64url_encode(signature)
        return token.decode("ascii"), float(int(exp))


class TokenVerifier:
    """Verifies tokens of one audience against known public keys."""

    def __init__(
        self,
        public_keys: dict[str, ec.EllipticCurvePublicKey],
        *,
        issuer: str,
        audience: str,
        leeway: float = LEEWAY_SECONDS,
    ) -> None:
        self.public_keys = dict(public_keys)
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    def verify(self, token: str) -> dict[str, Any]:
        """Returns the claims, or raises Unauthenticated with a precise reason.

        The checks, their order and their reasons are those of `jwt.get_unverified_header` followed
        by `jwt.decode(token, key, ["ES256"], audience=..., issuer=..., leeway=...,
        options={"require": REQUIRED_CLAIMS, "strict_aud": True})`, as this verifier did on PyJWT
        (tests/security/tokens/test_verifier_differential.py holds it to that).
        """
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise _invalid()
        header, signing_input, payload_segment, signature_segment = _split_compact(token)
        kid = header.get("kid")
        if "kid" in header and not isinstance(kid, str):
            raise _invalid()
        if "crit" in header and not _crit_understood_by_pyjwt(header):
            raise _invalid()  # PyJWT refuses these before it looks at `alg`
        b64 = header.get("b64", True)
        if b64 is False and payload_segment:
            raise _invalid()  # an unencoded (RFC 7797) payload travels detached: the segment is empty
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("token algorithm not allowed", reason="TOKEN_ALGORITHM_NOT_ALLOWED")
        if "crit" in header:
            raise Unauthenticated("token has unsupported critical headers", reason="TOKEN_INVALID")
        key = self.public_keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated("token signed by an unknown key", reason="TOKEN_UNKNOWN_KEY")
        if b64 is False:
            raise _invalid()  # PyJWT: `b64` needs a `crit` (refused above) and a detached payload
        _verify_es256(key, signing_input, signature_segment)
        claims = _json_object(payload_segment)
        self._check_claims(claims)
        return claims

    def _check_claims(self, claims: dict[str, Any]) -> None:
        """PyJWT's claim checks, in its order: required, iat, nbf, exp, iss, aud (strict), sub, jti."""
        for name in REQUIRED_CLAIMS:
            if claims.get(name) is None:
                raise _invalid()
        now = time.time()
        if _numeric_date(claims["iat"]) > now + self.leeway:
            raise Unauthenticated("token not yet valid", reason="TOKEN_NOT_YET_VALID")
        if "nbf" in claims and _numeric_date(claims["nbf"]) > now + self.leeway:
            raise Unauthenticated("token not yet valid", reason="TOKEN_NOT_YET_VALID")
        if _numeric_date(claims["exp"]) <= now - self.leeway:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED")
        iss = claims["iss"]
        if not isinstance(iss, str) or iss != self.issuer:
            raise Unauthenticated("token from another issuer", reason="TOKEN_WRONG_ISSUER")
        aud = claims["aud"]
        if not aud:
            raise _invalid()  # PyJWT: an empty audience is a missing one
        if not isinstance(aud, str) or aud != self.audience:
            raise Unauthenticated("token not meant for this service", reason="TOKEN_WRONG_AUDIENCE")
        if not isinstance(claims["sub"], str) or not isinstance(claims["jti"], str):
            raise _invalid()


def _invalid() -> Unauthenticated:
    return Unauthenticated("invalid token", reason="TOKEN_INVALID")


def _split_compact(token: str) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """The header, signing input, payload and signature segments of a compact JWS.

    Exactly three segments, each canonical unpadded base64url; the header a JSON object. Every
    segment is checked here, before anything in the header is believed, as PyJWT does.
    """
    try:
        data = token.encode("ascii")
    except UnicodeEncodeError:
        raise _invalid() from None
    segments = data.split(b".")
    if len(segments) != 3:
        raise _invalid()
    header_segment, payload_segment, signature_segment = segments
    if not (_is_b64url(header_segment) and _is_b64url(payload_segment) and _is_b64url(signature_segment)):
        raise _invalid()
    header = _json_object(header_segment)
    return header, data[: len(header_segment) + 1 + len(payload_segment)], payload_segment, signature_segment


def _json_object(segment: bytes) -> dict[str, Any]:
    """The JSON object a checked segment encodes. Duplicate keys: the last one wins, as in PyJWT
    (refusing them would cost a Python hook per object, and only our own key signs what gets here)."""
    try:
        value = json.loads(_b64url_decode(segment))
    except (ValueError, RecursionError):
        raise _invalid() from None
    if not isinstance(value, dict):
        raise _invalid()
    return value


def _crit_understood_by_pyjwt(header: dict[str, Any]) -> bool:
    """Whether PyJWT gets past this `crit` to the `alg` check: a non-empty list of extensions it
    implements (only `b64`), each present in the header."""
    crit = header["crit"]
    return isinstance(crit, list) and bool(crit) and all(ext == "b64" for ext in crit) and "b64" in header


def _verify_es256(key: object, signing_input: bytes, signature_segment: bytes) -> None:
    """ECDSA P-256 SHA-256 over `signing_input`; the signature is r||s, 32 bytes each (RFC 7518 §3.4)."""
    signature = _b64url_decode(signature_segment)
    if (
        len(signature) != 2 * _COORDINATE_BYTES
        or not isinstance(key, ec.EllipticCurvePublicKey)
        or not isinstance(key.curve, ec.SECP256R1)
    ):
        raise _invalid()
    der = encode_dss_signature(
        int.from_bytes(signature[:_COORDINATE_BYTES], "big"),
        int.from_bytes(signature[_COORDINATE_BYTES:], "big"),
    )
    try:
        key.verify(der, signing_input, _ECDSA_SHA256)
    except InvalidSignature:
        raise _invalid() from None


def _numeric_date(value: Any) -> int:
    """A NumericDate claim as PyJWT compares it (`int()`, truncating), but only from a JSON number:
    PyJWT's `int()` also takes `true` and numeric strings, RFC 7519 §2 does not."""
    if type(value) is not int and type(value) is not float:
        raise _invalid()
    try:
        return int(value)
    except (ValueError, OverflowError):  # NaN, Infinity (Python's json reads both)
        raise _invalid() from None


def decode_claims(
    token: str,
    key: Any,
    algorithm: str,
    *,
    audience: str,
    issuer: str,
    leeway: float,
    options: Options,
) -> dict[str, Any]:
    """Checks the signature and the registered claims; PyJWT's errors become Unauthenticated reasons."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options=options,
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
    except jwt.ImmatureSignatureError:
        raise Unauthenticated("token not yet valid", reason="TOKEN_NOT_YET_VALID") from None
    except jwt.InvalidAudienceError:
        raise Unauthenticated("token not meant for this service", reason="TOKEN_WRONG_AUDIENCE") from None
    except jwt.InvalidIssuerError:
        raise Unauthenticated("token from another issuer", reason="TOKEN_WRONG_ISSUER") from None
    except jwt.PyJWTError:
        raise Unauthenticated("invalid token", reason="TOKEN_INVALID") from None
    return claims


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None
