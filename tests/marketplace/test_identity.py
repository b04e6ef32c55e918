"""Workflow 1 through a real server: accounts, login, refresh rotation, token checks."""

from __future__ import annotations

import base64
import json
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from eddie.marketplace.v1 import identity_pb2
from eddie_common.tokens import AUDIENCE_AIIDA, AUDIENCE_MARKETPLACE, SigningKey, TokenIssuer
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

C = identity_pb2.ROLE_CUSTOMER
PASSWORD = "correct horse battery staple"


def create(email: str = "ada@example.org", password: str = PASSWORD, name: str = "Ada", role: int = C):
    return identity_pb2.CreateAccountRequest(email=email, password=password, display_name=name, role=role)


async def test_create_account_returns_the_account(marketplace: RunningMarketplace) -> None:
    stub = marketplace.client().identity
    account = await stub.CreateAccount(create(role=identity_pb2.ROLE_ELIGIBLE_PARTY, name="Wien Energie"))
    assert account.name.startswith("accounts/")
    assert account.email == "ada@example.org"
    assert account.display_name == "Wien Energie"
    assert account.role == identity_pb2.ROLE_ELIGIBLE_PARTY
    assert account.create_time.seconds > 0


async def test_duplicate_email_is_already_exists_case_insensitively(marketplace: RunningMarketplace) -> None:
    stub = marketplace.client().identity
    await stub.CreateAccount(create())
    await expect_error(
        stub.CreateAccount(create(email="ADA@Example.org")), grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN"
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (create(email=""), "email"),
        (create(email="not-an-email"), "email"),
        (create(password=""), "password"),
        (create(password="short"), "password"),
        (create(password="aaaaaaaaaaaaaaaa"), "password"),
        (create(name=""), "display_name"),
        (create(name="x" * 101), "display_name"),
        (create(name="bad\x00name"), "display_name"),
        (create(role=identity_pb2.ROLE_UNSPECIFIED), "role"),
        (create(role=99), "role"),
    ],
)
async def test_invalid_account_fields_are_named(
    marketplace: RunningMarketplace, request_: identity_pb2.CreateAccountRequest, field: str
) -> None:
    await expect_error(
        marketplace.client().identity.CreateAccount(request_), grpc.StatusCode.INVALID_ARGUMENT, field=field
    )


async def test_wrong_password_and_unknown_email_look_the_same(marketplace: RunningMarketplace) -> None:
    stub = marketplace.client().identity
    await stub.CreateAccount(create())
    wrong = await expect_error(
        stub.CreateToken(
            identity_pb2.CreateTokenRequest(email="ada@example.org", password="wrong password!!")
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )
    unknown = await expect_error(
        stub.CreateToken(identity_pb2.CreateTokenRequest(email="bob@example.org", password=PASSWORD)),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )
    assert wrong.details() == unknown.details()


async def test_login_and_current_account(marketplace: RunningMarketplace) -> None:
    stub = marketplace.client().identity
    created = await stub.CreateAccount(create())
    token = await stub.CreateToken(
        identity_pb2.CreateTokenRequest(email="Ada@example.org", password=PASSWORD)
    )
    assert token.account.name == created.name
    assert token.expire_time.seconds > time.time()
    me = await stub.GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=(("authorization", f"Bearer {token.access_token}"),)
    )
    assert me.name == created.name


async def test_refresh_rotates_and_reuse_revokes_the_family(marketplace: RunningMarketplace) -> None:
    client = await marketplace.customer()
    stub = client.identity
    first = client.refresh_token
    second = await stub.RefreshToken(identity_pb2.RefreshTokenRequest(refresh_token=first))
    assert second.refresh_token != first
    assert second.access_token
    me = await stub.GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(),
        metadata=(("authorization", f"Bearer {second.access_token}"),),
    )
    assert me.name == client.account.name
    # Reusing the spent token revokes the whole family, including the newest token.
    await expect_error(
        stub.RefreshToken(identity_pb2.RefreshTokenRequest(refresh_token=first)),
        grpc.StatusCode.UNAUTHENTICATED,
        "REFRESH_TOKEN_REUSED",
    )
    await expect_error(
        stub.RefreshToken(identity_pb2.RefreshTokenRequest(refresh_token=second.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )


async def test_unknown_refresh_token_is_unauthenticated(marketplace: RunningMarketplace) -> None:
    await expect_error(
        marketplace.client().identity.RefreshToken(identity_pb2.RefreshTokenRequest(refresh_token="rt_nope")),
        grpc.StatusCode.UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, object], payload: dict[str, object], signature: bytes = b"") -> str:
    return ".".join([_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature)])


async def _claims_for(marketplace: RunningMarketplace) -> tuple[dict[str, object], str]:
    client = await marketplace.customer()
    claims = jwt.decode(client.token, options={"verify_signature": False})
    return claims, client.token


async def test_interceptor_rejects_bad_tokens(marketplace: RunningMarketplace) -> None:
    claims, good = await _claims_for(marketplace)
    app_key = marketplace.app.signing_key
    kid = app_key.key_id
    public_pem = app_key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header, _, sig = good.split(".")
    tampered_claims = dict(claims, sub="accounts/someone-else")
    tampered = ".".join([header, _b64(json.dumps(tampered_claims).encode()), sig])
    now = int(time.time())
    issuer = TokenIssuer(app_key, marketplace.app.config.issuer)
    other_key = TokenIssuer(SigningKey.generate(), marketplace.app.config.issuer)
    expired = jwt.encode(
        dict(claims, iat=now - 7200, nbf=now - 7200, exp=now - 3600),
        app_key.private_key,
        "ES256",
        headers={"kid": kid},
    )
    hs256 = _forge({"alg": "HS256", "kid": kid, "typ": "JWT"}, claims)
    import hashlib
    import hmac

    signing_input = ".".join(hs256.split(".")[:2]).encode()
    hs256 = ".".join(
        [*hs256.split(".")[:2], _b64(hmac.new(public_pem, signing_input, hashlib.sha256).digest())]
    )
    cases = {
        "garbage": ("Bearer not.a.jwt", "TOKEN_INVALID"),
        "alg none": ("Bearer " + _forge({"alg": "none", "kid": kid}, claims), "TOKEN_ALGORITHM_NOT_ALLOWED"),
        "hs256 with public key": ("Bearer " + hs256, "TOKEN_ALGORITHM_NOT_ALLOWED"),
        "tampered payload": ("Bearer " + tampered, "TOKEN_INVALID"),
        "wrong audience": (
            "Bearer "
            + issuer.issue(str(claims["sub"]), AUDIENCE_AIIDA, 60, role=claims["role"], typ="access")[0],
            "TOKEN_WRONG_AUDIENCE",
        ),
        "expired": ("Bearer " + expired, "TOKEN_EXPIRED"),
        "another key": (
            "Bearer "
            + other_key.issue(
                str(claims["sub"]), AUDIENCE_MARKETPLACE, 60, role=claims["role"], typ="access"
            )[0],
            "TOKEN_UNKNOWN_KEY",
        ),
        "empty bearer": ("Bearer ", "TOKEN_MISSING"),
        "basic scheme": ("Basic dXNlcjpwYXNz", "TOKEN_MISSING"),
    }
    stub = marketplace.client().identity
    for name, (value, reason) in cases.items():
        err = await expect_error(
            stub.GetCurrentAccount(
                identity_pb2.GetCurrentAccountRequest(), metadata=(("authorization", value),)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        from eddie_common.interceptors import error_info

        info = error_info(err)
        assert info is not None
        assert info.reason == reason, (name, info.reason)
    await expect_error(
        stub.GetCurrentAccount(identity_pb2.GetCurrentAccountRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_MISSING",
    )


async def test_signing_keys_are_public_and_verify_tokens(marketplace: RunningMarketplace) -> None:
    client = await marketplace.customer()
    keys = await marketplace.client().identity.ListSigningKeys(identity_pb2.ListSigningKeysRequest())
    assert keys.issuer == marketplace.app.config.issuer
    (key,) = keys.signing_keys
    assert key.algorithm == "ES256"
    claims = jwt.decode(
        client.token, key.public_key_pem, algorithms=["ES256"], audience="marketplace", issuer=keys.issuer
    )
    assert claims["sub"] == client.account.name
    assert jwt.get_unverified_header(client.token)["kid"] == key.key_id
