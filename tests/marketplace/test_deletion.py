"""IdentityService.DeleteAccount (GDPR Art. 17): every effect API.md lists, for both roles."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import pytest

from eddie.aiida.v1 import aiida_pb2
from eddie.marketplace.v1 import consent_pb2, data_request_pb2, identity_pb2, instance_pb2
from eddie_client.client import Session as Client
from marketplace_server.db.models import AccountRow
from marketplace_server.services.permissions import PermissionTx
from tests.support.access import (
    Permission,
    aiida,
    market,
    matched_scene,
)
from tests.support.aiida_double import RunningAiida
from tests.support.expect import expect_error
from tests.support.marketplace import RunningMarketplace

__all__ = ["aiida", "market"]  # fixtures

DataAccess = aiida_pb2.DataAccess


def _delete(client: Client, name: str | None = None) -> Any:
    assert client.account is not None
    return client.identity.DeleteAccount(
        identity_pb2.DeleteAccountRequest(name=client.account.name if name is None else name),
        metadata=client.metadata,
    )


def _whoami(client: Client) -> Any:
    return client.identity.GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=client.metadata
    )


async def _read_to_the_end(call: Any) -> None:
    while (message := await call.read()) is not grpc.aio.EOF:
        assert message.HasField("permission_update") or message.HasField("ready")


async def test_only_the_account_itself_may_delete_it(market: RunningMarketplace) -> None:
    alice, bob = await market.customer(), await market.customer()
    assert bob.account is not None
    await expect_error(_delete(alice, bob.account.name), grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER")
    await expect_error(
        _delete(alice, "accounts/nosuchaccount0"), grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER"
    )
    await expect_error(_delete(alice, "users/alice"), grpc.StatusCode.INVALID_ARGUMENT, field="name")
    await expect_error(_delete(alice, ""), grpc.StatusCode.INVALID_ARGUMENT, field="name")
    await expect_error(
        market.client().identity.DeleteAccount(identity_pb2.DeleteAccountRequest(name=bob.account.name)),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_MISSING",
    )
    assert (await _whoami(bob)).name == bob.account.name


async def test_deleting_a_customer_revokes_unclaims_erases_and_refuses_its_tokens_at_once(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, [instance_id] = await matched_scene(market, aiida, instances=1)
    customer = scene.customers[instance_id]
    assert customer.account is not None
    [active] = await scene.request_access(instance_id)
    scene.double.configure_state = DataAccess.STATE_ACTIVE
    await scene.decide(active, approve=True)
    await scene.until_state(active, Permission.STATE_ACTIVE)
    [pending] = await (await scene.sibling()).request_access(instance_id)
    hooked: list[tuple[str, str]] = []

    async def receipt_hook(tx: PermissionTx, row: Any, reason: str) -> None:
        assert tx.session.in_transaction()
        hooked.append((row.id, reason))

    market.app.deletion.on_revoked_by_deletion.append(receipt_hook)
    consent = customer.consent.Connect(metadata=customer.metadata)
    assert (await consent.read()).HasField("access_request")  # the pending one

    await _delete(customer)

    # Tokens: refused at once (no cache window), the refresh token too, the open stream ends.
    await expect_error(_whoami(customer), grpc.StatusCode.UNAUTHENTICATED, "ACCOUNT_DISABLED")
    await expect_error(
        customer.identity.RefreshToken(
            identity_pb2.RefreshTokenRequest(refresh_token=customer.refresh_token)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await _read_to_the_end(consent)
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Permissions: the active one revoked (the AIIDA told, the receipt hook run), the pending one rejected.
    revoked, rejected = await scene.get(active), await scene.get(pending)
    assert (revoked.state, revoked.state_reason) == (
        Permission.STATE_REVOKED,
        "the customer deleted their account",
    )
    assert rejected.state == Permission.STATE_REJECTED
    assert hooked == [(active.name.removeprefix("permissions/"), revoked.state_reason)]
    # Its consent receipt (revoke) names the pseudonymous account id; the EP may still fetch it.
    receipt = await scene.ep.consent.GetConsentReceipt(
        consent_pb2.GetConsentReceiptRequest(permission=active.name), metadata=scene.ep.metadata
    )
    payload = json.loads(base64.urlsafe_b64decode(receipt.jws.split(".")[1] + "=="))
    assert (payload["decision"], payload["customer"]) == ("revoke", customer.account.name)
    assert payload["reason"] == revoked.state_reason and receipt.sequence == 2
    await scene.double.until(lambda: len(scene.double.revokes) == 1)
    assert scene.double.revokes[0].request.permission_id == active.name.removeprefix("permissions/")
    # The instance: unclaimed, its stream dropped, claimable again with its pairing code.
    await scene.until_linked(instance_id, linked=False)
    heir = await market.customer()
    claimed = await heir.instances.ClaimInstance(
        instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=f"CODE-{instance_id}"),
        metadata=heir.metadata,
    )
    assert heir.account is not None and claimed.owner == heir.account.name
    await scene.until_linked(instance_id)
    # Personal data erased; the e-mail is free again; the pseudonymous id stays for the receipts.
    async with market.app.sessions() as session:
        row = await session.get(AccountRow, customer.account.name.removeprefix("accounts/"))
    assert row is not None and row.delete_time is not None and row.disabled
    assert (row.email, row.display_name, row.password_hash) == ("", "", "")
    again = await market.client().identity.CreateAccount(
        identity_pb2.CreateAccountRequest(
            email=customer.account.email,
            password="correct horse battery staple",
            display_name="Back again",
            role=identity_pb2.ROLE_CUSTOMER,
        )
    )
    assert again.name != customer.account.name
    await expect_error(
        market.client().identity.CreateToken(
            identity_pb2.CreateTokenRequest(email="", password="")  # an erased e-mail matches nobody
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_deleting_an_eligible_party_closes_its_requests_and_terminates_its_permissions(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, [instance_id] = await matched_scene(market, aiida, instances=1)
    customer = scene.customers[instance_id]
    [active] = await scene.request_access(instance_id)
    scene.double.configure_state = DataAccess.STATE_ACTIVE
    await scene.decide(active, approve=True)
    await scene.until_state(active, Permission.STATE_ACTIVE)
    [pending] = await (await scene.sibling()).request_access(instance_id)

    await _delete(scene.ep)

    await expect_error(_whoami(scene.ep), grpc.StatusCode.UNAUTHENTICATED, "ACCOUNT_DISABLED")
    for permission in (active, pending):
        seen = await scene.get(permission, customer)
        assert (seen.state, seen.state_reason) == (
            Permission.STATE_TERMINATED,
            "the eligible party deleted its account",
        )
    await scene.double.until(lambda: len(scene.double.revokes) == 1)
    assert scene.double.revokes[0].request.permission_id == active.name.removeprefix("permissions/")
    listed = await customer.data_requests.ListDataRequests(
        data_request_pb2.ListDataRequestsRequest(show_closed=True), metadata=customer.metadata
    )
    mine = [d for d in listed.data_requests if d.owner == scene.data_request.owner]
    assert len(mine) == 2 and all(d.state == data_request_pb2.DataRequest.STATE_CLOSED for d in mine)
    # The customer's instance stays theirs.
    instance = await customer.instances.GetInstance(
        instance_pb2.GetInstanceRequest(name=f"instances/{instance_id}"), metadata=customer.metadata
    )
    assert customer.account is not None and instance.owner == customer.account.name
    await expect_error(
        customer.consent.RevokePermission(
            consent_pb2.RevokePermissionRequest(name=active.name, reason="x"), metadata=customer.metadata
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PERMISSION_NOT_ACTIVE",
    )
