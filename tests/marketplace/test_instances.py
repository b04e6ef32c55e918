"""Workflow 2 through a real server: registration (trust on first use), claiming, visibility."""

from __future__ import annotations

import grpc
import pytest

from eddie.marketplace.v1 import instance_pb2
from eddie_common.tokens import key_id_of, load_public_key
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

SECRET = "s" * 20 + "-very-secret-0123456789"
CODE = "K7MX-3QPA"


def register(
    instance_id: str = "aiida-vienna-1", address: str = "127.0.0.1:1", secret: str = SECRET, code: str = CODE
) -> instance_pb2.RegisterInstanceRequest:
    return instance_pb2.RegisterInstanceRequest(
        instance_id=instance_id, address=address, instance_secret=secret, pairing_code=code
    )


async def test_registration_is_public_and_returns_the_marketplace_key(
    marketplace: RunningMarketplace,
) -> None:
    response = await marketplace.client().instances.RegisterInstance(register())
    assert response.instance.name == "instances/aiida-vienna-1"
    assert response.instance.state == instance_pb2.Instance.STATE_REGISTERED
    assert response.instance.owner == ""
    assert not response.instance.connected
    key = load_public_key(response.marketplace_public_key)
    assert key_id_of(key) == marketplace.app.signing_key.key_id
    assert response.marketplace_issuer == marketplace.app.config.issuer


async def test_reregistration_with_the_same_secret_updates_the_address(
    marketplace: RunningMarketplace,
) -> None:
    stub = marketplace.client().instances
    first = await stub.RegisterInstance(register(address="127.0.0.1:1"))
    second = await stub.RegisterInstance(register(address="aiida.local:50052"))
    assert second.instance.address == "aiida.local:50052"
    assert second.instance.register_time == first.instance.register_time
    assert second.instance.last_seen_time.ToNanoseconds() >= first.instance.last_seen_time.ToNanoseconds()


async def test_hijacking_reregistration_with_another_secret_is_denied(
    marketplace: RunningMarketplace,
) -> None:
    stub = marketplace.client().instances
    await stub.RegisterInstance(register(address="127.0.0.1:1"))
    await expect_error(
        stub.RegisterInstance(register(address="evil.example:443", secret="x" * 40)),
        grpc.StatusCode.PERMISSION_DENIED,
        "INSTANCE_SECRET_MISMATCH",
    )
    customer = await marketplace.customer()
    claimed = await customer.instances.ClaimInstance(
        instance_pb2.ClaimInstanceRequest(instance_id="aiida-vienna-1", pairing_code=CODE),
        metadata=customer.metadata,
    )
    assert claimed.address == "127.0.0.1:1"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (register(instance_id=""), "instance_id"),
        (register(instance_id="a"), "instance_id"),
        (register(instance_id="-starts-with-dash"), "instance_id"),
        (register(instance_id="x" * 65), "instance_id"),
        (register(instance_id="has space"), "instance_id"),
        (register(address=""), "address"),
        (register(address="nohost"), "address"),
        (register(address="host:0"), "address"),
        (register(address="host:70000"), "address"),
        (register(address="ho st:80"), "address"),
        (register(secret="short"), "instance_secret"),
        (register(secret="x" * 257), "instance_secret"),
        (register(code="abc"), "pairing_code"),
        (register(code="bad code!"), "pairing_code"),
    ],
)
async def test_invalid_registration_fields_are_named(
    marketplace: RunningMarketplace, request_: instance_pb2.RegisterInstanceRequest, field: str
) -> None:
    await expect_error(
        marketplace.client().instances.RegisterInstance(request_),
        grpc.StatusCode.INVALID_ARGUMENT,
        field=field,
    )


async def test_claim_rules(marketplace: RunningMarketplace) -> None:
    await marketplace.client().instances.RegisterInstance(register())
    alice, bob = await marketplace.customer(), await marketplace.customer()
    ep = await marketplace.eligible_party()

    def claim(client, code=CODE, instance_id="aiida-vienna-1"):  # type: ignore[no-untyped-def]
        return client.instances.ClaimInstance(
            instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=code),
            metadata=client.metadata,
        )

    await expect_error(
        claim(alice, code="WRONG-CODE"), grpc.StatusCode.PERMISSION_DENIED, "INVALID_PAIRING_CODE"
    )
    await expect_error(claim(alice, instance_id="nobody-here"), grpc.StatusCode.NOT_FOUND)
    await expect_error(claim(ep), grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    await expect_error(claim(marketplace.client()), grpc.StatusCode.UNAUTHENTICATED)
    instance = await claim(alice)
    assert instance.state == instance_pb2.Instance.STATE_CLAIMED
    assert instance.owner == alice.account.name
    assert instance.claim_time.seconds > 0
    again = await claim(alice)
    assert again.claim_time == instance.claim_time
    # The owner's retry still needs the right code (API.md: a wrong code is PERMISSION_DENIED).
    await expect_error(
        claim(alice, code="WRONG-CODE"), grpc.StatusCode.PERMISSION_DENIED, "INVALID_PAIRING_CODE"
    )
    await expect_error(claim(bob), grpc.StatusCode.ALREADY_EXISTS, "INSTANCE_ALREADY_CLAIMED")


async def test_pairing_code_attempts_are_rate_limited(marketplace: RunningMarketplace) -> None:
    await marketplace.client().instances.RegisterInstance(register())
    mallory = await marketplace.customer()
    codes = []
    for i in range(12):
        try:
            await mallory.instances.ClaimInstance(
                instance_pb2.ClaimInstanceRequest(
                    instance_id="aiida-vienna-1", pairing_code=f"GUESS-{i:04d}"
                ),
                metadata=mallory.metadata,
            )
        except grpc.aio.AioRpcError as err:
            codes.append(err.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert codes[0] == grpc.StatusCode.PERMISSION_DENIED


async def test_customers_see_only_their_own_instances(marketplace: RunningMarketplace) -> None:
    stub = marketplace.client().instances
    for i in range(5):
        await stub.RegisterInstance(register(instance_id=f"home-{i}", code=f"CODE-{i:04d}"))
    alice, bob = await marketplace.customer(), await marketplace.customer()
    for i in range(5):
        owner = alice if i < 3 else bob
        await owner.instances.ClaimInstance(
            instance_pb2.ClaimInstanceRequest(instance_id=f"home-{i}", pairing_code=f"CODE-{i:04d}"),
            metadata=owner.metadata,
        )
    page1 = await alice.instances.ListInstances(
        instance_pb2.ListInstancesRequest(page_size=2), metadata=alice.metadata
    )
    assert [i.instance_id for i in page1.instances] == ["home-0", "home-1"]
    page2 = await alice.instances.ListInstances(
        instance_pb2.ListInstancesRequest(page_size=2, page_token=page1.next_page_token),
        metadata=alice.metadata,
    )
    assert [i.instance_id for i in page2.instances] == ["home-2"]
    assert page2.next_page_token == ""
    # Bob's page token is bound to Bob; Alice cannot use it, and Alice's instance is NOT_FOUND for Bob.
    await expect_error(
        bob.instances.ListInstances(
            instance_pb2.ListInstancesRequest(page_size=2, page_token=page1.next_page_token),
            metadata=bob.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    mine = await alice.instances.GetInstance(
        instance_pb2.GetInstanceRequest(name="instances/home-0"), metadata=alice.metadata
    )
    assert mine.owner == alice.account.name
    await expect_error(
        bob.instances.GetInstance(
            instance_pb2.GetInstanceRequest(name="instances/home-0"), metadata=bob.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        bob.instances.GetInstance(instance_pb2.GetInstanceRequest(name="home-0"), metadata=bob.metadata),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="name",
    )
