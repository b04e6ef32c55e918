"""Consent receipts: written with every decision, chained per customer, verifiable offline."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import grpc
import pytest
from jwt.api_jws import PyJWS

from eddie.marketplace.v1 import consent_pb2, identity_pb2
from eddie_client.client import Session
from eddie_client.receipts import (
    ReceiptError,
    fetch_signing_keys,
    receipt_hash,
    verify_chain,
    verify_receipt,
)
from eddie_common.tokens import SigningKey
from tests.marketplace.test_consent import Device, decision
from tests.support.access import Scene, aiida, market, new_scene
from tests.support.aiida_double import RunningAiida
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

__all__ = ["aiida", "market"]  # fixtures


async def receipts_of(customer: Session, page_size: int = 0) -> list[consent_pb2.ConsentReceipt]:
    """The customer's whole chain, page by page."""
    found: list[consent_pb2.ConsentReceipt] = []
    token = ""
    while True:
        page = await customer.consent.ListConsentReceipts(
            consent_pb2.ListConsentReceiptsRequest(page_size=page_size, page_token=token),
            metadata=customer.metadata,
        )
        found.extend(page.consent_receipts)
        token = page.next_page_token
        if not token:
            return found


async def keys_of(market: RunningMarketplace) -> dict[str, Any]:
    return await fetch_signing_keys(market.client().identity)


async def three_decisions(scene: Scene) -> tuple[Session, list[Any]]:
    """One customer: approves one access (unary), rejects another (on Connect), revokes the first."""
    customer = await scene.market.customer("Alice")
    first = await scene.add_instance(customer)
    second = await scene.add_instance(customer)
    await scene.search()
    approved, rejected = await scene.request_access(first, second)
    await scene.decide(approved, True, "fine for research")
    device = Device(customer)
    try:
        await device.until_ready()
        await device.outgoing.put(decision(rejected, False, "not my heating"))
        await device.until(lambda m: m.permission_update.name == rejected.name)
    finally:
        device.close()
    await customer.consent.RevokePermission(
        consent_pb2.RevokePermissionRequest(name=approved.name, reason="changed my mind"),
        metadata=customer.metadata,
    )
    return customer, [approved, rejected]


async def test_approve_reject_and_revoke_make_a_three_receipt_chain_that_verifies_offline(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    customer, (approved, rejected) = await three_decisions(scene)
    chain = await receipts_of(customer)
    verified = verify_chain(chain, await keys_of(market))

    assert [(r.sequence, r.decision, r.permission) for r in verified] == [
        (1, "approve", approved.name),
        (2, "reject", rejected.name),
        (3, "revoke", approved.name),
    ]
    first = verified[0].claims
    assert first["previous_hash"] == ""
    assert verified[1].claims["previous_hash"] == receipt_hash(chain[0].jws)
    assert first["customer"] == customer.account.name  # type: ignore[union-attr]
    assert first["eligible_party"] == scene.ep.account.name  # type: ignore[union-attr]
    assert first["data_request"] == scene.data_request.name
    assert first["purpose"] == "Grid planning research"
    assert first["data_need"]["energyType"] == "ENERGY_TYPE_ELECTRICITY"
    assert first["reason"] == "fine for research"
    assert verified[1].claims["reason"] == "not my heating"
    assert verified[2].claims["reason"] == "changed my mind"
    assert first["time"].endswith("Z")
    assert {r.key_id for r in verified} == set(await keys_of(market))


async def test_a_page_at_a_time_lists_the_same_chain(market: RunningMarketplace, aiida: RunningAiida) -> None:
    scene = await new_scene(market, aiida)
    customer, _ = await three_decisions(scene)
    assert await receipts_of(customer, page_size=1) == await receipts_of(customer)


def _payload(jws: str) -> dict[str, Any]:
    body = jws.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def _with_payload(jws: str, claims: dict[str, Any]) -> str:
    """`jws` with its payload replaced and the old signature kept (an edit by someone without the key)."""
    header, _, signature = jws.split(".")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{body}.{signature}"


async def test_an_altered_removed_or_reordered_receipt_is_detected(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    customer, _ = await three_decisions(scene)
    keys = await keys_of(market)
    chain = [r.jws for r in await receipts_of(customer)]
    verify_chain(chain, keys)

    altered = _payload(chain[1]) | {"decision": "approve"}
    cases = {
        "altered": [chain[0], _with_payload(chain[1], altered), chain[2]],
        "removed": [chain[0], chain[2]],
        "removed first": chain[1:],
        "reordered": [chain[1], chain[0], chain[2]],
    }
    for what, tampered in cases.items():
        with pytest.raises(ReceiptError) as caught:
            verify_chain(tampered, keys)
        assert caught.value.position in (1, 2), what

    # Re-signed by someone else under the marketplace's kid, or by an unknown key: both refused.
    forger = SigningKey.generate()
    kid = next(iter(keys))
    for forged_kid in (kid, forger.key_id):
        forged = PyJWS().encode(
            json.dumps(altered).encode(), forger.private_key, algorithm="ES256", headers={"kid": forged_kid}
        )
        with pytest.raises(ReceiptError):
            verify_chain([chain[0], forged, chain[2]], keys)

    # The message's own (unsigned) fields must agree with the signed claims.
    messages = await receipts_of(customer)
    messages[2].permission = messages[1].permission
    with pytest.raises(ReceiptError):
        verify_chain(messages, keys)


async def test_the_customer_and_the_eligible_party_get_a_permissions_latest_receipt(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    customer, (approved, _) = await three_decisions(scene)
    request = consent_pb2.GetConsentReceiptRequest(permission=approved.name)
    for reader in (customer, scene.ep):
        latest = await reader.consent.GetConsentReceipt(request, metadata=reader.metadata)
        assert (latest.permission, latest.sequence) == (approved.name, 3)
        assert verify_receipt(latest.jws, await keys_of(market)).decision == "revoke"

    stranger = await market.customer()
    other_ep = await market.eligible_party()
    for outsider in (stranger, other_ep):
        await expect_error(
            outsider.consent.GetConsentReceipt(request, metadata=outsider.metadata),
            grpc.StatusCode.NOT_FOUND,
            "CONSENT_RECEIPT_NOT_FOUND",
        )
    pending = (await scene.request_access(next(iter(scene.customers))))[0]
    await expect_error(
        scene.ep.consent.GetConsentReceipt(
            consent_pb2.GetConsentReceiptRequest(permission=pending.name), metadata=scene.ep.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
        "CONSENT_RECEIPT_NOT_FOUND",
    )


async def test_receipts_are_for_customers_and_eligible_parties_see_none(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    ep = await market.eligible_party()
    await expect_error(
        ep.consent.ListConsentReceipts(consent_pb2.ListConsentReceiptsRequest(), metadata=ep.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    newcomer = await market.customer()
    assert await receipts_of(newcomer) == []


async def test_concurrent_decisions_of_one_customer_do_not_fork_the_chain(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene = await new_scene(market, aiida)
    customer = await market.customer()
    instances = [await scene.add_instance(customer) for _ in range(6)]
    await scene.search()
    permissions = await scene.request_access(*instances)
    await asyncio.gather(*(scene.decide(p, i % 2 == 0) for i, p in enumerate(permissions)))
    verified = verify_chain(await receipts_of(customer), await keys_of(market))
    assert [r.sequence for r in verified] == [1, 2, 3, 4, 5, 6]
    assert {r.permission for r in verified} == {p.name for p in permissions}


async def test_receipts_name_only_pseudonymous_ids(market: RunningMarketplace, aiida: RunningAiida) -> None:
    scene = await new_scene(market, aiida)
    customer, _ = await three_decisions(scene)
    account: identity_pb2.Account = customer.account  # type: ignore[assignment]
    for receipt in await receipts_of(customer):
        text = json.dumps(_payload(receipt.jws))
        assert account.email not in text and account.display_name not in text
