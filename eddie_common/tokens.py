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
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.types import Options

from eddie_common.errors import Unauthenticated

ALGORITHM = "ES256"
AUDIENCE_MARKETPLACE = "marketplace"
AUDIENCE_AIIDA = "aiida"
AUDIENCE_SINK = "eddie-sink"
DEFAULT_ISSUER = "eddie-marketplace"
MAX_TOKEN_LENGTH = 8192
LEEWAY_SECONDS = 30


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
    """Signs tokens with the marketplace key."""

    def __init__(self, key: SigningKey, issuer: str = DEFAULT_ISSUER) -> None:
        self.key = key
        self.issuer = issuer

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
        token = jwt.encode(
            payload, self.key.private_key, algorithm=ALGORITHM, headers={"kid": self.key.key_id}
        )
        return token, float(int(exp))


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
        """Returns the claims, or raises Unauthenticated with a precise reason."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("invalid token", reason="TOKEN_INVALID")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token", reason="TOKEN_INVALID") from None
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("token algorithm not allowed", reason="TOKEN_ALGORITHM_NOT_ALLOWED")
        if "crit" in header:
            raise Unauthenticated("token has unsupported critical headers", reason="TOKEN_INVALID")
        kid = header.get("kid")
        key = self.public_keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated("token signed by an unknown key", reason="TOKEN_UNKNOWN_KEY")
        claims = decode_claims(
            token,
            key,
            ALGORITHM,
            audience=self.audience,
            issuer=self.issuer,
            leeway=self.leeway,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"], "strict_aud": True},
        )
        if not isinstance(claims.get("sub"), str):
            raise Unauthenticated("invalid token", reason="TOKEN_INVALID")
        return claims


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
