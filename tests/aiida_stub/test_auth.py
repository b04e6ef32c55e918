"""Only the marketplace the instance registered at may call it, with a token for that instance."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from aiida_stub.auth import trust_for
from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie_common import tokens
from eddie_common.interceptors import error_info
from tests.support.expect import expect_error
from tests.support.stub import ISSUER, FakeMarketplace, RunningStub, start_stub, stub_config

INSTANCE = "aiida-test-1"


async def expect_unauthenticated(
    stub: RunningStub, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    call = stub.aiida.ListDataAccesses(aiida_pb2.ListDataAccessesRequest(), metadata=metadata)
    err = await expect_error(call, grpc.StatusCode.UNAUTHENTICATED, reason)
    info = error_info(err)
    assert info is not None
    assert info.domain == "aiida.eddie"


def bearer(token: str, instance_id: str = INSTANCE) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), ("aiida-instance-id", instance_id))


async def test_correctly_signed_token_is_accepted(stub: RunningStub) -> None:
    response = await stub.aiida.ListDataAccesses(
        aiida_pb2.ListDataAccessesRequest(), metadata=stub.metadata()
    )
    assert list(response.data_accesses) == []


async def test_registration_sent_the_advertised_address_and_pairing_code(stub: RunningStub) -> None:
    service = stub.marketplace.service
    assert service.addresses[INSTANCE] == f"127.0.0.1:{stub.port}"
    assert service.pairing_codes[INSTANCE] == stub.app.instances[INSTANCE].record.pairing_code
    assert len(service.secrets[INSTANCE]) >= 32


async def test_token_from_another_key_is_rejected(stub: RunningStub) -> None:
    other = tokens.TokenIssuer(tokens.SigningKey.generate(), ISSUER)
    token, _ = other.issue(f"instances/{INSTANCE}", tokens.AUDIENCE_AIIDA, 300)
    await expect_unauthenticated(stub, bearer(token), "TOKEN_UNKNOWN_KEY")


async def test_token_for_another_instance_is_rejected(stub: RunningStub) -> None:
    token = stub.marketplace.token("aiida-someone-else")
    await expect_unauthenticated(stub, bearer(token), "INSTANCE_MISMATCH")


async def test_token_for_another_instance_is_rejected_even_after_it_was_cached(stub: RunningStub) -> None:
    token = stub.marketplace.token(INSTANCE)
    await stub.aiida.ListDataAccesses(aiida_pb2.ListDataAccessesRequest(), metadata=bearer(token))
    await expect_unauthenticated(stub, bearer(token, "aiida-other"), "UNKNOWN_INSTANCE")


async def test_missing_instance_header_is_rejected(stub: RunningStub) -> None:
    metadata = (("authorization", f"Bearer {stub.marketplace.token(INSTANCE)}"),)
    await expect_unauthenticated(stub, metadata, "INSTANCE_ID_MISSING")


async def test_unknown_instance_is_rejected(stub: RunningStub) -> None:
    await expect_unauthenticated(stub, bearer(stub.marketplace.token("nobody"), "nobody"), "UNKNOWN_INSTANCE")


async def test_missing_token_is_rejected(stub: RunningStub) -> None:
    await expect_unauthenticated(stub, (("aiida-instance-id", INSTANCE),), "TOKEN_MISSING")


async def test_wrong_audience_is_rejected(stub: RunningStub) -> None:
    token = stub.marketplace.token(INSTANCE, audience=tokens.AUDIENCE_SINK)
    await expect_unauthenticated(stub, bearer(token), "TOKEN_WRONG_AUDIENCE")


async def test_expired_token_is_rejected(stub: RunningStub) -> None:
    token = stub.marketplace.token(INSTANCE, ttl=-3600)
    await expect_unauthenticated(stub, bearer(token), "TOKEN_EXPIRED")


async def test_garbage_token_is_rejected(stub: RunningStub) -> None:
    await expect_unauthenticated(stub, bearer("not-a-jwt"), "TOKEN_INVALID")


async def test_connect_is_authenticated_too(stub: RunningStub) -> None:
    call = stub.aiida.Connect(metadata=bearer(stub.marketplace.token("aiida-someone-else")))
    await expect_error(call.read(), grpc.StatusCode.UNAUTHENTICATED, "INSTANCE_MISMATCH")


async def test_calls_before_registration_are_refused(tmp_path: Path, marketplace: FakeMarketplace) -> None:
    marketplace.service.fail_next = 1_000  # the marketplace keeps answering UNAVAILABLE
    running = await start_stub(stub_config(tmp_path, marketplace), marketplace, registered=False)
    try:
        while marketplace.service.calls < 2:  # registration was tried, and retried
            await asyncio.sleep(0.01)
        await expect_unauthenticated(running, running.metadata(), "NOT_REGISTERED")
        marketplace.service.fail_next = 0  # the marketplace comes up: the stub's retries get through
        await asyncio.wait_for(running.app.wait_registered(), 10)
        await running.aiida.ListDataAccesses(aiida_pb2.ListDataAccessesRequest(), metadata=running.metadata())
    finally:
        await running.close()


async def test_health_and_reflection_need_no_token(stub: RunningStub) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(stub.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_fleet_instances_share_one_trust_per_key() -> None:
    key = tokens.SigningKey.generate()
    assert trust_for(key.public_pem, ISSUER) is trust_for(key.public_pem, ISSUER)
    with pytest.raises(ValueError, match=r"PEM|key|Could not"):
        trust_for("not a key", ISSUER)


def test_servicer_is_the_generated_base_class() -> None:
    from aiida_stub.servicer import AiidaServiceServicer

    assert issubclass(AiidaServiceServicer, aiida_pb2_grpc.AiidaServiceServicer)
