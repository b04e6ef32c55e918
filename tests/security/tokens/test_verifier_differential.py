"""Our own tokens without PyJWT: accepted and refused exactly as PyJWT would, for the same reasons.

`TokenVerifier` parses compact JWS and checks claims itself, and `TokenIssuer` builds the tokens itself
(eddie_common/tokens.py says why). The oracle is the verifier as it was on PyJWT: `jwt.get_unverified_header`,
the header rules, then `jwt.decode` with the same options and the same mapping of errors to reasons. On top of
it the oracle knows the two refusals added on purpose: `=` padding, and `exp`/`nbf`/`iat` that are not JSON
numbers. Hypothesis builds tokens from a valid one by zero to three hostile changes (header fields, claims,
JSON spelling, signatures of every wrong shape and key, byte-level damage), and every one must get the same
claims or the same (reason, message) from both.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from eddie_common import tokens
from eddie_common.errors import Unauthenticated

ISSUER = "eddie-marketplace"
AUDIENCE = tokens.AUDIENCE_AIIDA
LEEWAY = tokens.LEEWAY_SECONDS
KEY = tokens.SigningKey.generate()
OTHER = tokens.SigningKey.generate()  # a key the verifier does not know
P384 = ec.generate_private_key(ec.SECP384R1())  # registered under a kid, but not usable for ES256
P384_KID = "p384-key"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
PUBLIC_PEM = KEY.public_pem.encode()
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def verifier() -> tokens.TokenVerifier:
    keys: dict[str, Any] = {KEY.key_id: KEY.public_key, P384_KID: P384.public_key()}
    return tokens.TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE)


VERIFIER = verifier()

# --- the oracle: the verifier as it was on PyJWT, plus the two deliberate refusals -----------------


def _json_number(value: Any) -> bool:
    return type(value) in (int, float)


class NumericDatesFromNumbersOnly(jwt.PyJWT):
    """PyJWT, with RFC 7519's NumericDate: `int()` of a JSON number only (PyJWT takes `true` and `"123"`)."""

    def _validate_iat(self, payload: dict[str, Any], now: float, leeway: float) -> None:
        if not _json_number(payload["iat"]):
            raise jwt.InvalidIssuedAtError("Issued At claim (iat) must be a number.")
        super()._validate_iat(payload, now, leeway)

    def _validate_nbf(self, payload: dict[str, Any], now: float, leeway: float) -> None:
        if not _json_number(payload["nbf"]):
            raise jwt.DecodeError("Not Before claim (nbf) must be a number.")
        super()._validate_nbf(payload, now, leeway)

    def _validate_exp(self, payload: dict[str, Any], now: float, leeway: float) -> None:
        if not _json_number(payload["exp"]):
            raise jwt.DecodeError("Expiration Time claim (exp) must be a number.")
        super()._validate_exp(payload, now, leeway)


STRICT_PYJWT = NumericDatesFromNumbersOnly()


def pyjwt_verify(v: tokens.TokenVerifier, token: str, *, deliberate: bool = True) -> dict[str, Any]:
    """`TokenVerifier.verify` as it was before the compact-JWS path (with `decode_claims` inlined), with
    the two deliberate refusals unless `deliberate` is False."""
    if not token or len(token) > tokens.MAX_TOKEN_LENGTH:
        raise Unauthenticated("invalid token", reason="TOKEN_INVALID")
    if deliberate and "=" in token:  # deliberate: RFC 7515 base64url has no padding
        raise Unauthenticated("invalid token", reason="TOKEN_INVALID")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Unauthenticated("invalid token", reason="TOKEN_INVALID") from None
    if header.get("alg") != tokens.ALGORITHM:
        raise Unauthenticated("token algorithm not allowed", reason="TOKEN_ALGORITHM_NOT_ALLOWED")
    if "crit" in header:
        raise Unauthenticated("token has unsupported critical headers", reason="TOKEN_INVALID")
    kid = header.get("kid")
    key = v.public_keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise Unauthenticated("token signed by an unknown key", reason="TOKEN_UNKNOWN_KEY")
    try:
        claims: dict[str, Any] = (STRICT_PYJWT if deliberate else jwt.PyJWT()).decode(
            token,
            key,
            algorithms=[tokens.ALGORITHM],
            audience=v.audience,
            issuer=v.issuer,
            leeway=v.leeway,
            options={"require": list(tokens.REQUIRED_CLAIMS), "strict_aud": True},
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
    if not isinstance(claims.get("sub"), str):
        raise Unauthenticated("invalid token", reason="TOKEN_INVALID")
    return claims


Outcome = tuple[str, Any]


def outcome(verify: Callable[[str], dict[str, Any]], token: str) -> Outcome:
    try:
        return ("accepted", verify(token))
    except Unauthenticated as exc:
        return (exc.reason, exc.message)


def assert_same(token: str) -> Outcome:
    expected = outcome(lambda t: pyjwt_verify(VERIFIER, t), token)
    got = outcome(VERIFIER.verify, token)
    assert got == expected, token
    return got


# --- building tokens ------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def raw_signature(private: ec.EllipticCurvePrivateKey, signing_input: bytes, size: int = 32) -> bytes:
    r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def high_s(signature: bytes) -> bytes:
    """The other valid signature of the same message (s -> n - s): ECDSA's malleability."""
    s = int.from_bytes(signature[32:], "big")
    return signature[:32] + (P256_ORDER - s).to_bytes(32, "big")


SIGNATURES: dict[str, Callable[[bytes], bytes]] = {
    "es256": lambda m: raw_signature(KEY.private_key, m),
    "other-key": lambda m: raw_signature(OTHER.private_key, m),
    "p384-key": lambda m: raw_signature(P384, m, 48),
    "none": lambda m: b"",
    # The classic key confusion: HS256 with the verifier's public key as the HMAC secret.
    "hs256-public-pem": lambda m: hmac.new(PUBLIC_PEM, m, hashlib.sha256).digest(),
    "der": lambda m: KEY.private_key.sign(m, ec.ECDSA(hashes.SHA256())),
    "63-bytes": lambda m: raw_signature(KEY.private_key, m)[:63],
    "65-bytes": lambda m: raw_signature(KEY.private_key, m) + b"\x00",
    "65-bytes-leading-zero": lambda m: b"\x00" + raw_signature(KEY.private_key, m),
    "high-s": lambda m: high_s(raw_signature(KEY.private_key, m)),
    "zeros": lambda m: bytes(64),
    "r-is-n": lambda m: P256_ORDER.to_bytes(32, "big") + raw_signature(KEY.private_key, m)[32:],
    "flipped-bit": lambda m: bytes([raw_signature(KEY.private_key, m)[0] ^ 1]) + bytes(63),
}

MISSING = object()
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def numeric_dates(now: int) -> st.SearchStrategy[Any]:
    # Offsets at least 10 s from every boundary (iat/nbf: now + leeway; exp: now - leeway).
    offsets = st.sampled_from(
        [-86400, -LEEWAY - 10, -LEEWAY + 10, -10, 0, 10, LEEWAY - 10, LEEWAY + 10, 86400]
    )
    return st.one_of(
        offsets.map(lambda o: now + o),
        offsets.map(lambda o: now + o + 0.5),
        offsets.map(lambda o: str(now + o)),  # PyJWT's int() takes it; refused on purpose
        st.sampled_from(
            [
                True,
                False,
                None,
                "tomorrow",
                " 1 ",
                [now],
                {"t": now},
                float("nan"),
                float("inf"),
                -float("inf"),
            ]
        ),
        st.sampled_from([10**30, -(10**30), 1e300, 0, -1]),
    )


HEADER_VALUES: dict[str, list[Any]] = {
    "alg": ["none", "None", "HS256", "RS256", "ES384", "es256", "ES256 ", "", None, 1, ["ES256"], MISSING],
    "kid": [OTHER.key_id, P384_KID, "", "../signing-key.pem", 5, None, [KEY.key_id], MISSING],
    "crit": [["b64"], [], ["exp"], "b64", [1], ["b64", "b64"], ["b64", "x"], None],
    "b64": [True, False, "false", 0, None],
    "typ": ["at+jwt", None, 1, MISSING],
    "jwk": [{"kty": "EC"}],
    "x5u": ["https://evil.example/k"],
}

CLAIM_NAMES = ["exp", "nbf", "iat", "iss", "aud", "sub", "jti"]


def claim_values(name: str, now: int) -> st.SearchStrategy[Any]:
    if name in ("exp", "nbf", "iat"):
        return numeric_dates(now) | st.just(MISSING)
    fixed: dict[str, list[Any]] = {
        "iss": ["evil-marketplace", "", ISSUER + " ", None, 5, [ISSUER], MISSING],
        "aud": ["marketplace", tokens.AUDIENCE_SINK, "", [], [AUDIENCE], None, 0, False, {"a": 1}, MISSING],
        "sub": [42, None, "", ["x"], MISSING],
        "jti": [5, None, "", MISSING],
    }
    return st.sampled_from(fixed[name])


def encodings(value: Any) -> st.SearchStrategy[bytes]:
    """Ways to spell a JSON object (or to fail to)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return st.sampled_from(
        [
            text.encode(),
            json.dumps(value).encode(),
            b" " + text.encode() + b"\n",
            text.encode("utf-16-le"),
            text.encode("utf-16"),
            b"\xef\xbb\xbf" + text.encode(),
            # A duplicate key: the last one counts (for PyJWT's json.loads and ours alike).
            b'{"exp":1,"alg":"none",' + text.encode()[1:]
            if text.startswith("{") and len(text) > 2
            else b"{}",
            text.encode()[:-1] + b',"aud":"marketplace","exp":"x"}' if len(text) > 2 else b"{}",
            text.encode() + b"x",
            b"[" + text.encode() + b"]",
            b'"' + text.encode().replace(b'"', b"") + b'"',
            b"null",
            b"1",
            b"",
            b"{" * 3000,
        ]
    )


@st.composite
def hostile_tokens(draw: st.DrawFn) -> str:
    now = int(time.time())
    header: dict[str, Any] = {"alg": "ES256", "kid": KEY.key_id, "typ": "JWT"}
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "instances/aiida-1",
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "j-" + draw(st.text(B64URL, min_size=1, max_size=16)),
    }
    claims.update(draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=2)))
    header_bytes: bytes | None = None
    payload_bytes: bytes | None = None
    signature = "es256"
    damage: list[Callable[[str], str]] = []
    for change in draw(st.lists(st.sampled_from(CHANGES), max_size=3)):
        event(change)
        if change == "header":
            name = draw(st.sampled_from(sorted(HEADER_VALUES)))
            header[name] = draw(st.sampled_from(HEADER_VALUES[name]))
        elif change == "claim":
            name = draw(st.sampled_from(CLAIM_NAMES))
            claims[name] = draw(claim_values(name, now))
        elif change == "header-spelling":
            header_bytes = draw(encodings({k: v for k, v in header.items() if v is not MISSING}))
        elif change == "payload-spelling":
            payload_bytes = draw(encodings({k: v for k, v in claims.items() if v is not MISSING}))
        elif change == "signature":
            signature = draw(st.sampled_from(sorted(SIGNATURES)))
        else:
            damage.append(draw(DAMAGE[change]))
    if header_bytes is None:
        header_bytes = compact({k: v for k, v in header.items() if v is not MISSING})
    if payload_bytes is None:
        payload_bytes = compact({k: v for k, v in claims.items() if v is not MISSING})
    signing_input = f"{b64url(header_bytes)}.{b64url(payload_bytes)}"
    token = f"{signing_input}.{b64url(SIGNATURES[signature](signing_input.encode()))}"
    for hurt in damage:
        token = hurt(token)
    return token


def _segment_edit(edit: Callable[[str], str], index: int) -> Callable[[str], str]:
    def apply(token: str) -> str:
        parts = token.split(".")
        i = index % len(parts)
        parts[i] = edit(parts[i])
        return ".".join(parts)

    return apply


def _non_canonical(segment: str) -> str:
    """The same bytes spelled with unused trailing bits set (what PyJWT's re-encoding check refuses)."""
    if len(segment) % 4 in (2, 3) and segment[-1] in B64URL:
        return segment[:-1] + B64URL[B64URL.index(segment[-1]) | 1]
    return segment


def _at(index: int, edit: Callable[[str, int], str]) -> Callable[[str], str]:
    return lambda token: edit(token, index % (len(token) + 1))


INDEX = st.integers(0, 2000)
JUNK = st.sampled_from([*B64URL, "+", "/", "=", ".", " ", "\t", "\n", "!", "é", "\x00", "%2E"])
DAMAGE: dict[str, st.SearchStrategy[Callable[[str], str]]] = {
    "padding": st.builds(
        lambda pad, i: _segment_edit(lambda s: s + pad, i),
        st.sampled_from(["=", "==", "===", "=" * 4]),
        INDEX,
    ),
    "segments": st.sampled_from(
        [
            lambda t: t + ".e30",
            lambda t: t + ".",
            lambda t: "." + t,
            lambda t: t.rsplit(".", 1)[0],
            lambda t: t.replace(".", "..", 1),
            lambda t: ".".join(reversed(t.split("."))),
            lambda t: t.split(".")[0] + "." + t.split(".")[0] + "." + t.split(".")[-1],
            lambda t: t + "." + t,
            lambda t: t.rsplit(".", 1)[0] + ".",
        ]
    ),
    "non-canonical": st.builds(lambda i: _segment_edit(_non_canonical, i), INDEX),
    "replace-char": st.builds(lambda i, c: _at(i, lambda t, j: t[:j] + c + t[j + 1 :]), INDEX, JUNK),
    "insert-char": st.builds(lambda i, c: _at(i, lambda t, j: t[:j] + c + t[j:]), INDEX, JUNK),
    "truncate": st.builds(lambda i: _at(i, lambda t, j: t[:j]), INDEX),
    "whitespace": st.sampled_from([lambda t: " " + t, lambda t: t + "\n", lambda t: "\t" + t + " "]),
    "oversize": st.just(_segment_edit(lambda s: s + "A" * tokens.MAX_TOKEN_LENGTH, 1)),
}
# Claims and header fields reach the later checks (and their reasons), so they come up more often.
CHANGES = [
    *["claim"] * 6,
    *["header"] * 3,
    *["signature"] * 2,
    "header-spelling",
    "payload-spelling",
    *DAMAGE,
]


# --- the differential ----------------------------------------------------------------------------


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_tokens())
@example("")
@example("e30.e30.")
@example("..")
@example("a.b.c")
def test_the_verifier_accepts_and_refuses_exactly_as_pyjwt_does(token: str) -> None:
    event(assert_same(token)[0])


# Claims `issue` sets itself, and its own parameter names.
NOT_EXTRA = {*tokens.REQUIRED_CLAIMS, "nbf", "self", "subject", "audience", "ttl_seconds"}


@settings(max_examples=300, deadline=None)
@given(
    subject=st.text(max_size=40),
    audience=st.sampled_from([AUDIENCE, "marketplace", tokens.AUDIENCE_SINK]),
    ttl=st.sampled_from([-3600, -LEEWAY - 10, -LEEWAY + 10, 60, 86400]),
    extra=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in NOT_EXTRA), JSON_VALUES),
)
def test_issued_tokens_are_what_pyjwt_makes_and_verify_alike(
    subject: str, audience: str, ttl: int, extra: dict[str, Any]
) -> None:
    token, expiry = tokens.TokenIssuer(KEY, ISSUER).issue(subject, audience, ttl, **extra)
    header, payload, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    # Byte for byte PyJWT's header and payload (ECDSA signatures are randomised, so not the signature).
    again = jwt.encode(claims, KEY.private_key, algorithm="ES256", headers={"kid": KEY.key_id})
    assert again.split(".")[:2] == [header, payload]
    assert len(base64.urlsafe_b64decode(signature + "==")) == 64
    assert expiry == claims["exp"]
    # PyJWT verifies the signature; both verifiers agree on the rest.
    jwt.decode(
        token, KEY.public_key, algorithms=["ES256"], options={"verify_aud": False, "verify_exp": False}
    )
    for aud in {AUDIENCE, audience}:
        v = tokens.TokenVerifier({KEY.key_id: KEY.public_key}, issuer=ISSUER, audience=aud)
        expected = outcome(functools.partial(pyjwt_verify, v), token)
        assert outcome(v.verify, token) == expected
        if aud == audience and ttl > -LEEWAY:
            assert expected == ("accepted", claims)


# --- named cases: the reason each gets, as the suites of the programs expect ----------------------


def _token(
    header: dict[str, Any] | None = None,
    signature: str = "es256",
    padded: bool = False,
    **changes: Any,
) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "instances/aiida-1",
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "j",
    }
    for name, value in changes.items():
        if value is MISSING:
            claims.pop(name)
        else:
            claims[name] = value(now) if callable(value) else value
    head = {"alg": "ES256", "kid": KEY.key_id, "typ": "JWT", **(header or {})}
    head = {k: v for k, v in head.items() if v is not MISSING}
    encode = base64.urlsafe_b64encode if padded else lambda data: b64url(data).encode()
    signing_input = encode(compact(head)) + b"." + encode(compact(claims))
    return f"{signing_input.decode()}.{encode(SIGNATURES[signature](signing_input)).decode()}"


def _detached(token: str) -> str:
    """The RFC 7797 detached form: an empty payload segment."""
    header, _, signature = token.split(".")
    return f"{header}..{signature}"


# Built when the test runs: the time claims are relative to now.
NAMED = [
    pytest.param(lambda: _token(), "accepted", id="valid"),
    pytest.param(lambda: _token(signature="high-s"), "accepted", id="high-s-as-pyjwt-and-cryptography"),
    pytest.param(
        lambda: _token(header={"alg": "none"}, signature="none"), "TOKEN_ALGORITHM_NOT_ALLOWED", id="alg-none"
    ),
    pytest.param(
        lambda: _token(header={"alg": "HS256"}, signature="hs256-public-pem"),
        "TOKEN_ALGORITHM_NOT_ALLOWED",
        id="hs256-with-the-public-key-as-secret",
    ),
    pytest.param(lambda: _token(header={"alg": MISSING}), "TOKEN_ALGORITHM_NOT_ALLOWED", id="alg-missing"),
    pytest.param(lambda: _token(header={"kid": OTHER.key_id}), "TOKEN_UNKNOWN_KEY", id="kid-unknown"),
    pytest.param(lambda: _token(header={"kid": 5}), "TOKEN_INVALID", id="kid-not-a-string"),
    pytest.param(lambda: _token(header={"crit": ["exp"]}), "TOKEN_INVALID", id="crit"),
    pytest.param(
        lambda: _token(header={"crit": ["exp"], "alg": "none"}, signature="none"),
        "TOKEN_INVALID",
        id="crit-before-alg",
    ),
    pytest.param(
        lambda: _token(header={"crit": ["b64"], "b64": True, "alg": "none"}, signature="none"),
        "TOKEN_ALGORITHM_NOT_ALLOWED",
        id="crit-pyjwt-understands-then-alg",
    ),
    pytest.param(lambda: _token(header={"b64": False}), "TOKEN_INVALID", id="b64-false"),
    pytest.param(
        lambda: _token(header={"b64": False, "alg": "none"}, signature="none"),
        "TOKEN_INVALID",
        id="b64-false-before-alg",
    ),
    pytest.param(
        lambda: _detached(_token(header={"b64": False, "alg": "none"}, signature="none")),
        "TOKEN_ALGORITHM_NOT_ALLOWED",
        id="b64-false-detached-then-alg",
    ),
    pytest.param(lambda: _detached(_token(header={"b64": False})), "TOKEN_INVALID", id="b64-false-detached"),
    pytest.param(lambda: _token(signature="63-bytes"), "TOKEN_INVALID", id="signature-63-bytes"),
    pytest.param(lambda: _token(signature="65-bytes"), "TOKEN_INVALID", id="signature-65-bytes"),
    pytest.param(lambda: _token(signature="der"), "TOKEN_INVALID", id="signature-der"),
    pytest.param(lambda: _token(signature="other-key"), "TOKEN_INVALID", id="signature-other-key"),
    pytest.param(
        lambda: _token(header={"kid": P384_KID}, signature="p384-key"), "TOKEN_INVALID", id="p384-key"
    ),
    pytest.param(lambda: _token(exp=lambda now: now - LEEWAY - 10), "TOKEN_EXPIRED", id="expired"),
    pytest.param(lambda: _token(exp=lambda now: now - LEEWAY + 10), "accepted", id="expired-within-leeway"),
    pytest.param(lambda: _token(nbf=lambda now: now + LEEWAY + 10), "TOKEN_NOT_YET_VALID", id="nbf-future"),
    pytest.param(lambda: _token(iat=lambda now: now + LEEWAY + 10), "TOKEN_NOT_YET_VALID", id="iat-future"),
    pytest.param(lambda: _token(iat="x"), "TOKEN_INVALID", id="iat-not-a-number"),
    pytest.param(lambda: _token(aud=[AUDIENCE]), "TOKEN_WRONG_AUDIENCE", id="aud-list"),
    pytest.param(lambda: _token(aud="marketplace"), "TOKEN_WRONG_AUDIENCE", id="aud-other"),
    pytest.param(lambda: _token(aud=""), "TOKEN_INVALID", id="aud-empty"),
    pytest.param(lambda: _token(iss="evil"), "TOKEN_WRONG_ISSUER", id="iss-wrong"),
    pytest.param(lambda: _token(iss=5), "TOKEN_WRONG_ISSUER", id="iss-not-a-string"),
    pytest.param(lambda: _token(jti=MISSING), "TOKEN_INVALID", id="jti-missing"),
    pytest.param(lambda: _token(sub=42), "TOKEN_INVALID", id="sub-not-a-string"),
    pytest.param(lambda: _token(exp=True), "TOKEN_INVALID", id="exp-bool"),
    pytest.param(lambda: _token(exp="tomorrow"), "TOKEN_INVALID", id="exp-not-a-number"),
    pytest.param(
        lambda: _token(exp=lambda now: now - 3600, iss="evil"),
        "TOKEN_EXPIRED",
        id="first-failing-check-counts",
    ),
    pytest.param(lambda: _token() + ".", "TOKEN_INVALID", id="four-segments"),
    pytest.param(lambda: " " + _token(), "TOKEN_INVALID", id="leading-space"),
]


@pytest.mark.parametrize(("token", "reason"), NAMED)
def test_named_tokens_get_their_reason_from_both(token: Callable[[], str], reason: str) -> None:
    assert assert_same(token())[0] == reason


# --- the two deliberate differences ---------------------------------------------------------------


def _pyjwt_plain(token: str) -> Outcome:
    return outcome(functools.partial(pyjwt_verify, VERIFIER, deliberate=False), token)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: _token(padded=True), id="padded-and-signed-so"),
        pytest.param(lambda: _token(exp=lambda now: str(now + 300)), id="exp-a-numeric-string"),
        pytest.param(lambda: _token(nbf=True), id="nbf-true"),
        pytest.param(lambda: _token(iat=lambda now: f" {now} "), id="iat-a-spaced-string"),
        pytest.param(lambda: _token(iat=lambda now: f"{now:_}"), id="iat-with-underscores"),
    ],
)
def test_what_pyjwt_takes_and_this_verifier_refuses_on_purpose(token: Callable[[], str]) -> None:
    made = token()
    assert _pyjwt_plain(made)[0] == "accepted"
    assert outcome(VERIFIER.verify, made) == ("TOKEN_INVALID", "invalid token")


# --- the issuer ------------------------------------------------------------------------------------


def test_the_issuer_follows_a_replaced_key() -> None:
    issuer = tokens.TokenIssuer(OTHER, ISSUER)
    issuer.key = KEY  # what LiveKeys does on rotation
    token, _ = issuer.issue("instances/aiida-1", AUDIENCE, 60)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": KEY.key_id, "typ": "JWT"}
    assert VERIFIER.verify(token)["sub"] == "instances/aiida-1"


def test_the_issuer_refuses_a_key_that_is_not_p256() -> None:
    issuer = tokens.TokenIssuer(tokens.SigningKey(P384, P384_KID), ISSUER)
    with pytest.raises(ValueError, match="P-256"):
        issuer.issue("instances/aiida-1", AUDIENCE, 60)
