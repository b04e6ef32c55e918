"""An external OpenID Connect provider's access tokens, beside the embedded IAM (issue 16.3).

A local provider serves discovery and JWKS over HTTP on port 0; the marketplace runs in process.
Covers the RFC 8725 cases, key rotation without restart, and the role mapping.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from google.rpc import error_details_pb2, status_pb2

from eddie.marketplace.v1 import identity_pb2
from eddie_client.client import Session
from marketplace_server.oidc import OidcDiscoveryError
from marketplace_server.server import create_server
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config
from tests.support.oidc_provider import OidcProvider, ProviderKey

AUDIENCE = "eddie-marketplace"
WHOAMI = identity_pb2.GetCurrentAccountRequest()


@pytest.fixture
def provider() -> AsyncIterator[OidcProvider]:
    running = OidcProvider(keys=[ProviderKey.rsa(), ProviderKey.ec()]).start()
    yield running  # type: ignore[misc]
    running.stop()


@pytest.fixture
async def marketplace_oidc(tmp_path: Path, provider: OidcProvider) -> AsyncIterator[RunningMarketplace]:
    config = test_config(tmp_path, oidc_issuer=provider.issuer, oidc_audience=AUDIENCE)
    running = await start_marketplace(config)
    yield running
    await running.channel.close()
    await running.app.stop(0.5)


def _reason(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


async def whoami(mp: RunningMarketplace, token: str) -> identity_pb2.Account:
    client = Session(mp.channel, token)
    return await client.identity.GetCurrentAccount(WHOAMI, metadata=client.metadata)


async def refused(mp: RunningMarketplace, token: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await whoami(mp, token)
    return caught.value.code(), _reason(caught.value)


def _unsigned(header: dict[str, object], payload: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(payload)}."


async def test_a_token_of_the_provider_creates_an_account_on_first_use(
    marketplace_oidc: RunningMarketplace, provider: OidcProvider
) -> None:
    account = await whoami(marketplace_oidc, provider.token("alice", email="alice@example.org"))
    assert account.role == identity_pb2.ROLE_CUSTOMER
    assert account.display_name == "User alice"
    assert account.email == "alice@example.org"
    again = await whoami(marketplace_oidc, provider.token("alice", key=provider.keys[1]))  # ES256 key
    assert again.name == account.name  # the same sub maps to the same account
    other = await whoami(marketplace_oidc, provider.token("bob"))
    assert other.name != account.name


async def test_the_role_comes_from_the_role_claim(
    marketplace_oidc: RunningMarketplace, provider: OidcProvider
) -> None:
    ep = await whoami(marketplace_oidc, provider.token("utility", role="eligible_party"))
    assert ep.role == identity_pb2.ROLE_ELIGIBLE_PARTY
    in_a_list = await whoami(
        marketplace_oidc, provider.token("household", role=["offline_access", "customer"])
    )
    assert in_a_list.role == identity_pb2.ROLE_CUSTOMER


@pytest.mark.parametrize(
    "role",
    [None, "admin", ["customer", "eligible_party"], 7, ""],
    ids=["missing", "unknown", "both", "not-a-string", "empty"],
)
async def test_a_token_without_one_valid_role_is_refused(
    marketplace_oidc: RunningMarketplace, provider: OidcProvider, role: object
) -> None:
    code, reason = await refused(marketplace_oidc, provider.token("mallory", role=role))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "OIDC_ROLE_INVALID")


async def test_a_subject_cannot_change_its_role(
    marketplace_oidc: RunningMarketplace, provider: OidcProvider
) -> None:
    await whoami(marketplace_oidc, provider.token("carol", role="customer"))
    code, reason = await refused(marketplace_oidc, provider.token("carol", role="eligible_party"))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "OIDC_ROLE_MISMATCH")


async def test_embedded_accounts_keep_working_beside_the_provider(
    marketplace_oidc: RunningMarketplace, provider: OidcProvider
) -> None:
    embedded = await marketplace_oidc.customer("Embedded")
    account = await embedded.identity.GetCurrentAccount(WHOAMI, metadata=embedded.metadata)
    assert account.display_name == "Embedded"
    external = await whoami(marketplace_oidc, provider.token("dave", email=account.email))
    assert external.name != account.name  # the same e-mail never links to (or takes over) an embedded account


def _rfc8725_cases(provider: OidcProvider) -> dict[str, tuple[str, str]]:
    rsa_key = provider.keys[0]
    public_pem = (
        rsa_key.private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    now = int(time.time())
    claims = {"iss": provider.issuer, "sub": "eve", "aud": AUDIENCE, "iat": now, "exp": now + 300}
    stranger = ProviderKey.rsa(kid=rsa_key.kid)  # a listed kid, an unlisted key
    return {
        "alg none": (_unsigned({"alg": "none", "kid": rsa_key.kid}, claims), "TOKEN_ALGORITHM_NOT_ALLOWED"),
        "HS256 with the public key as secret": (
            jwt.encode(claims, public_pem.encode()[:64], algorithm="HS256", headers={"kid": rsa_key.kid}),
            "TOKEN_ALGORITHM_NOT_ALLOWED",
        ),
        "alg other than the key's": (
            provider.token("eve", algorithm="PS256"),
            "TOKEN_ALGORITHM_NOT_ALLOWED",
        ),
        "wrong audience": (provider.token("eve", audience="another-service"), "TOKEN_WRONG_AUDIENCE"),
        "expired": (provider.token("eve", ttl=-600), "TOKEN_EXPIRED"),
        "not yet valid": (provider.token("eve", nbf=now + 600), "TOKEN_NOT_YET_VALID"),
        "unknown kid": (provider.token("eve", key=ProviderKey.rsa()), "TOKEN_UNKNOWN_KEY"),
        "no kid": (
            jwt.encode(claims, rsa_key.private_key, algorithm="RS256"),
            "TOKEN_UNKNOWN_KEY",
        ),
        "forged signature": (provider.token("eve", key=stranger), "TOKEN_INVALID"),
        "embedded jwk header": (provider.token("eve", headers={"jwk": rsa_key.jwk()}), "TOKEN_INVALID"),
        "crit header": (provider.token("eve", headers={"crit": ["exp"]}), "TOKEN_INVALID"),
        "an ID token": (provider.token("eve", typ="ID"), "TOKEN_WRONG_TYPE"),
        "no subject": (
            jwt.encode(
                {k: v for k, v in claims.items() if k != "sub"} | {"eddie_role": "customer"},
                rsa_key.private_key,
                algorithm="RS256",
                headers={"kid": rsa_key.kid},
            ),
            "TOKEN_INVALID",
        ),
    }


async def test_rfc8725_cases_are_refused(
    marketplace_oidc: RunningMarketplace, provider: OidcProvider
) -> None:
    for case, (token, reason) in _rfc8725_cases(provider).items():
        code, got = await refused(marketplace_oidc, token)
        assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, reason), case


async def test_a_rotated_key_is_picked_up_without_restart(
    marketplace_oidc: RunningMarketplace, provider: OidcProvider
) -> None:
    cache = marketplace_oidc.app.components["authenticator"].external.keys
    cache.refetch_interval = 0.3
    old = provider.keys[0]
    await whoami(marketplace_oidc, provider.token("frank", key=old))
    new = ProviderKey.rsa()
    provider.keys = [new]  # the provider rotates: the old key is withdrawn
    time.sleep(0.35)
    account = await whoami(marketplace_oidc, provider.token("frank", key=new))
    assert account.role == identity_pb2.ROLE_CUSTOMER
    # An old token still names a kid the cache knows until the next scheduled refresh; what matters is
    # that the new key was fetched on first sight of its kid, without a restart.
    assert new.kid in cache._keys


async def test_unknown_kids_refetch_the_key_set_at_most_once_per_interval(
    marketplace_oidc: RunningMarketplace, provider: OidcProvider
) -> None:
    cache = marketplace_oidc.app.components["authenticator"].external.keys
    cache.refetch_interval = 60.0
    before = provider.jwks_fetches
    for _ in range(20):
        await refused(marketplace_oidc, provider.token("eve", key=ProviderKey.ec()))
    assert provider.jwks_fetches - before <= 1


async def test_an_unreachable_issuer_fails_start_up_with_one_clear_error(tmp_path: Path) -> None:
    provider = OidcProvider().start()
    issuer = provider.issuer
    provider.stop()
    config = test_config(tmp_path, oidc_issuer=issuer, oidc_audience=AUDIENCE)
    with pytest.raises(OidcDiscoveryError, match="unavailable"):
        await create_server(config)
    assert not (tmp_path / "marketplace").exists()  # checked before anything is written
