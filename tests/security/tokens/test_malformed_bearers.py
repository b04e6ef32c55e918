"""10: oversized tokens and bytes no gRPC client would send are refused cleanly; the programs keep serving."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import jwt
import pytest

from eddie_common import tokens
from eddie_common.errors import Unauthenticated
from tests.support.raw_http2 import raw_grpc_call
from tests.support.token_forgery import b64url
from tests.support.token_programs import INSTANCE, TARGETS, Programs, call, expect_refused

pytestmark = pytest.mark.asyncio(loop_scope="package")

# --- 10: oversized tokens and bytes no gRPC client would send -------------------------------------


async def assert_all_serving(p: Programs) -> None:
    await call(p, "marketplace", f"Bearer {p.customer.token}")
    await call(p, "aiida", f"Bearer {p.aiida_token(INSTANCE)}")
    await call(p, "sink-list", f"Bearer {p.ep.token}")


@pytest.mark.parametrize("target", TARGETS)
async def test_a_64_kib_bearer_is_refused_by_the_transport_and_the_program_keeps_serving(
    programs: Programs, target: str
) -> None:
    # gRPC's default metadata limits (8 KiB soft, 16 KiB hard) refuse it before the interceptor runs.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(programs, target, "Bearer " + "A" * 65536)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
    await assert_all_serving(programs)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda p: "e30." * 1800 + "x", "TOKEN_INVALID", id="7-kib-of-segments"),
        pytest.param(lambda p: b64url(b"{" * 5000) + ".e30.sig", "TOKEN_INVALID", id="deeply-nested-header"),
        pytest.param(
            lambda p: jwt.encode({}, p.key.private_key, algorithm="ES256", headers={"kid": "k" * 5000}),
            "TOKEN_UNKNOWN_KEY",
            id="signed-with-a-5000-char-kid",
        ),
        pytest.param(lambda p: "!@#$%^&*()_+{}|:<>?~`-=[]\\;',/", "TOKEN_INVALID", id="ascii-punctuation"),
        pytest.param(lambda p: "a.b .c", "TOKEN_INVALID", id="inner-space"),
    ],
)
async def test_large_or_odd_tokens_under_the_metadata_limit_are_refused_cleanly(
    programs: Programs, target: str, make: Callable[[Programs], str], reason: str
) -> None:
    await expect_refused(programs, target, make(programs), reason)


async def test_tokens_longer_than_the_limit_are_refused_before_parsing() -> None:
    # Past MAX_TOKEN_LENGTH the verifier does not even decode the header. Over gRPC such a bearer
    # is only sometimes under the server's soft metadata limit, so this is checked on the verifier.
    key = tokens.SigningKey.generate()
    verifier = tokens.TokenVerifier({key.key_id: key.public_key}, issuer="i", audience="marketplace")
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify("e30." + "A" * tokens.MAX_TOKEN_LENGTH)
    assert caught.value.reason == "TOKEN_INVALID"


RAW_PATHS = {
    "marketplace": b"/eddie.marketplace.v1.IdentityService/GetCurrentAccount",
    "aiida": b"/eddie.aiida.v1.AiidaService/ListDataAccesses",
    "sink": b"/eddie.framework.v1.DataSinkService/ListReadings",
}


INVALID = "invalid token"
RAW_VALUES = {  # the bearer, and the status message it gets (TOKEN_INVALID)
    "utf8-umlauts": ("Bearer äöü".encode(), INVALID),
    "invalid-utf8": (b"Bearer \xff\xfe\xfd", INVALID),
    "latin1-in-a-jwt": (b"Bearer eyJhbGciOiJFUzI1NiJ9.\xe9.\xe9", INVALID),
    "nul": (b"Bearer a\x00b", INVALID),
    "control-chars": (b"Bearer \x01\x02\x1b[31m", INVALID),
    "del": (b"Bearer \x7f\x7f", INVALID),
    "newline-injection": (b"Bearer x\r\nx-injected: 1", INVALID),
}


@pytest.mark.parametrize("program", list(RAW_PATHS))
@pytest.mark.parametrize(("value", "expected"), list(RAW_VALUES.values()), ids=list(RAW_VALUES))
async def test_bearer_bytes_outside_printable_ascii_are_unauthenticated(
    programs: Programs, program: str, value: bytes, expected: str
) -> None:
    headers = [(b"authorization", value)]
    if program == "aiida":
        headers.append((b"aiida-instance-id", INSTANCE.encode()))
    status, message = await raw_grpc_call(programs.ports[program], RAW_PATHS[program], headers)
    assert (status, message) == (grpc.StatusCode.UNAUTHENTICATED.value[0], expected)
    await assert_all_serving(programs)


async def test_instance_id_bytes_outside_printable_ascii_are_unauthenticated(programs: Programs) -> None:
    headers = [
        (b"authorization", f"Bearer {programs.aiida_token(INSTANCE)}".encode()),
        (b"aiida-instance-id", INSTANCE.encode() + b"\xff\x00"),
    ]
    status, message = await raw_grpc_call(programs.ports["aiida"], RAW_PATHS["aiida"], headers)
    assert (status, message) == (grpc.StatusCode.UNAUTHENTICATED.value[0], "unknown instance")
    await assert_all_serving(programs)
