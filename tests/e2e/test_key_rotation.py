"""Key rotation: receipts and tokens signed before it still verify, and a running AIIDA keeps working."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from eddie.marketplace.v1 import access_pb2, consent_pb2
from eddie_client.client import Session
from eddie_client.receipts import fetch_signing_keys, verify_chain
from marketplace_server.keyring import load_key_ring, rotate_signing_key
from tests.support.fleet import claim, create_data_request, search, start_aiida, wait_connected
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config

PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"


async def _stop(market: RunningMarketplace) -> None:
    await market.channel.close()
    await market.app.stop(0)


async def _search_until_matched(ep: Session, name: str, instance_id: str) -> None:
    started = time.monotonic()
    while instance_id not in (await search(ep, name, timeout=2))[0]:
        assert time.monotonic() - started < 30, "the AIIDA never answered the search"
        await asyncio.sleep(0.2)


def test_rotation_retires_the_current_key_and_keeps_it_in_the_ring(tmp_path: Path) -> None:
    first = load_key_ring(tmp_path)
    assert first.retired == () and first.device_key == first.current
    second = rotate_signing_key(tmp_path)
    ring = load_key_ring(tmp_path)
    assert ring.current.key_id == second.key_id != first.current.key_id
    assert [k.key_id for k in ring.retired] == [first.current.key_id]
    assert ring.device_key.key_id == first.current.key_id
    third = load_key_ring(tmp_path, rotate=True)
    assert [k.key_id for k in third.keys] == [third.current.key_id, second.key_id, first.current.key_id]
    assert (tmp_path / "retired-signing-keys" / f"{second.key_id}.pem").stat().st_mode & 0o077 == 0


async def test_after_a_rotation_old_receipts_and_tokens_verify_and_the_aiida_keeps_answering(
    tmp_path: Path,
) -> None:
    config = test_config(tmp_path, search_rate_per_minute=1000)
    market = await start_marketplace(config)
    aiida = await start_aiida(market, tmp_path / "aiidas", "rot-vienna", PROFILES / "vienna-p1.toml")
    try:
        customer, ep = await market.customer(), await market.eligible_party()
        await claim(customer, aiida)
        await wait_connected(customer, aiida.instance_id)
        request = await create_data_request(ep, regions=["AT-9"])
        await _search_until_matched(ep, request.name, aiida.instance_id)
        granted = await ep.access.RequestAccess(
            access_pb2.RequestAccessRequest(
                data_request=request.name, instance_ids=[aiida.instance_id], sink_uri="grpc://127.0.0.1:1"
            ),
            metadata=ep.metadata,
        )
        permission = granted.permissions[0].name
        await customer.consent.DecideAccess(
            consent_pb2.DecideAccessRequest(permission=permission, approve=True), metadata=customer.metadata
        )
        await _stop(market)

        market = await start_marketplace(replace(config, rotate_signing_key=True))
        keys = await fetch_signing_keys(market.client().identity)
        assert len(keys) == 2
        # Tokens signed with the retired key still work until they expire.
        customer = Session(market.channel, customer.token, customer.account)
        ep = Session(market.channel, ep.token, ep.account)
        await wait_connected(customer, aiida.instance_id)  # the AIIDA accepts the marketplace's calls
        await _search_until_matched(ep, request.name, aiida.instance_id)
        await customer.consent.RevokePermission(
            consent_pb2.RevokePermissionRequest(name=permission, reason="after the rotation"),
            metadata=customer.metadata,
        )
        chain = (
            await customer.consent.ListConsentReceipts(
                consent_pb2.ListConsentReceiptsRequest(), metadata=customer.metadata
            )
        ).consent_receipts
        verified = verify_chain(chain, keys)
        assert [r.decision for r in verified] == ["approve", "revoke"]
        assert verified[0].key_id != verified[1].key_id == market.app.signing_key.key_id
    finally:
        await aiida.app.stop(0)
        await _stop(market)
