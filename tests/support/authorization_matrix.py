"""The authorization matrix: for every RPC, its targets and what each caller gets."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, identity_pb2, instance_pb2
from tests.support.authorization import (
    ANON,
    CALLERS,
    CUSTOMER_A,
    CUSTOMER_B,
    EP_A,
    EP_B,
    GHOST_INSTANCE,
    GHOST_PERMISSION,
    NOT_OWNER,
    ROLE,
    UNAUTH,
    Build,
    Code,
    Ctx,
    Err,
    Expect,
    Ok,
    Permission,
    Row,
    access_request,
    data_request_body,
    nf,
)
from tests.support.authorization_checks import (
    account_of,
    closed,
    consent_channel,
    created_by_caller,
    decided_on_stream,
    feed_of,
    has_keys,
    in_state,
    instance_of,
    is_caller,
    is_data_request,
    is_permission,
    is_search,
    lists_both_tenants,
    lists_owned_by,
    new_account,
    own_instances,
    own_permissions,
    own_receipts,
    page_continues,
    read_data_request,
    read_instance_row,
    read_permission,
    read_permissions_of,
    read_search_count,
    receipt_of,
    refused_on_stream,
    registered_owned_by,
    registered_unclaimed,
    replayed,
    replayed_access,
    requested,
    searched,
    watched,
)
from tests.support.world import PASSWORD, SECRET

# --- the matrix ---


def everyone(expect: Expect) -> dict[str, Expect]:
    return dict.fromkeys(CALLERS, expect)


def signed_in(expect: Expect) -> dict[str, Expect]:
    return {**dict.fromkeys(CALLERS, expect), ANON: UNAUTH}


def by_tenant(
    own: str, *, customer: Expect, ep: Expect, other_customer: Expect, other_ep: Expect
) -> dict[str, Expect]:
    """Expectations for the objects of tenant `own` ("A" or "B"), by the caller's relation to them."""
    other = "B" if own == "A" else "A"
    return {
        ANON: UNAUTH,
        f"customer_{own}": customer,
        f"ep_{own}": ep,
        f"customer_{other}": other_customer,
        f"ep_{other}": other_ep,
    }


def both(make: Callable[[str], list[Row]]) -> list[Row]:
    """Rows for tenant A's objects and the mirrored rows for tenant B's."""
    return make("A") + make("B")


def identity_rows() -> dict[str, list[Row]]:
    return {
        "IdentityService.CreateAccount": [
            Row(
                "a new account (public)",
                lambda ctx, caller: identity_pb2.CreateAccountRequest(
                    email=f"{ctx.unique('authz')}@example.org",
                    password=PASSWORD,
                    display_name="Matrix",
                    role=identity_pb2.ROLE_CUSTOMER,
                ),
                everyone(Ok(new_account)),
            ),
            # Sign-up necessarily tells that an e-mail is taken; it tells nothing else about the account.
            Row(
                "customer A's e-mail",
                lambda ctx, caller: identity_pb2.CreateAccountRequest(
                    email=ctx.a.customer.account.email,  # type: ignore[union-attr]
                    password=PASSWORD,
                    display_name="Impostor",
                    role=identity_pb2.ROLE_CUSTOMER,
                ),
                everyone(Err(Code.ALREADY_EXISTS, "EMAIL_TAKEN")),
            ),
        ],
        "IdentityService.CreateToken": [
            Row(
                "customer A's credentials (public)",
                lambda ctx, caller: identity_pb2.CreateTokenRequest(
                    email=ctx.a.customer.account.email,  # type: ignore[union-attr]
                    password=PASSWORD,
                ),
                everyone(Ok(account_of("A"))),
            ),
            Row(
                "customer A's e-mail, a wrong password",
                lambda ctx, caller: identity_pb2.CreateTokenRequest(
                    email=ctx.a.customer.account.email,  # type: ignore[union-attr]
                    password=PASSWORD + "!",
                ),
                everyone(Err(Code.UNAUTHENTICATED, "INVALID_CREDENTIALS")),
            ),
        ],
        "IdentityService.RefreshToken": [
            # The token is a bearer credential: whoever presents it gets A's session, not their own.
            Row(
                "customer A's refresh token (public)",
                lambda ctx, caller: identity_pb2.RefreshTokenRequest(refresh_token=ctx.refresh_tokens.pop()),
                everyone(Ok(account_of("A"))),
            ),
        ],
        "IdentityService.GetCurrentAccount": [
            Row(
                "the caller's account",
                lambda ctx, caller: identity_pb2.GetCurrentAccountRequest(),
                signed_in(Ok(is_caller)),
            ),
        ],
        "IdentityService.ListSigningKeys": [
            Row(
                "the public keys (public)",
                lambda ctx, caller: identity_pb2.ListSigningKeysRequest(),
                everyone(Ok(has_keys)),
            ),
        ],
        # Deletion would end the world's tenants: each caller is a fresh stand-in of the same role.
        "IdentityService.DeleteAccount": [
            Row(
                "customer A's account",
                lambda ctx, caller: identity_pb2.DeleteAccountRequest(name=ctx.a.customer_name),
                signed_in(NOT_OWNER),
                ghost=lambda ctx, caller: identity_pb2.DeleteAccountRequest(name="accounts/nosuchaccount0"),
                snapshot=_account_of_a,
                stand_ins=True,
            ),
            Row(
                "a malformed name",
                lambda ctx, caller: identity_pb2.DeleteAccountRequest(name="users/someone"),
                signed_in(Err(Code.INVALID_ARGUMENT, "INVALID_ARGUMENT")),
                stand_ins=True,
            ),
            Row(
                "the caller's own account",
                lambda ctx, caller: identity_pb2.DeleteAccountRequest(name=ctx.account(caller)),
                signed_in(Ok()),
                stand_ins=True,
            ),
        ],
    }


async def _account_of_a(ctx: Ctx) -> object:
    found = await ctx.a.customer.identity.GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=ctx.a.customer.metadata
    )
    return found.SerializeToString(deterministic=True)


def _register(instance_id: str, secret: str = SECRET, address: str = "") -> Callable[[Ctx, str], Message]:
    def build(ctx: Ctx, caller: str) -> Message:
        return instance_pb2.RegisterInstanceRequest(
            instance_id=instance_id or ctx.unique("authz-new"),
            address=address or ctx.world.aiida.address,
            instance_secret=secret,
            pairing_code="PAIR-123456",
        )

    return build


def _claim(instance_of_tenant: str, code: str = "") -> Callable[[Ctx, str], Message]:
    def build(ctx: Ctx, caller: str) -> Message:
        t = ctx.tenant(instance_of_tenant)
        return instance_pb2.ClaimInstanceRequest(
            instance_id=t.instance_id, pairing_code=code or t.pairing_code
        )

    return build


def instance_rows() -> dict[str, list[Row]]:
    def register(own: str) -> list[Row]:
        instance_id = "fuzz-claimed-1" if own == "A" else "authz-b-1"
        return [
            # Trust on first use: another secret can neither take over nor move the instance.
            Row(
                f"{own}'s instance id with another secret",
                _register(instance_id, secret="h" * 40, address="127.0.0.1:9"),
                everyone(Err(Code.PERMISSION_DENIED, "INSTANCE_SECRET_MISMATCH")),
                snapshot=lambda ctx: read_instance_row(ctx, instance_id),
            ),
            # The device's own restart (its secret, same address) keeps the owner.
            Row(
                f"{own}'s instance id with its secret",
                _register(instance_id),
                everyone(Ok(registered_owned_by(own))),
            ),
        ]

    def claim(own: str) -> list[Row]:
        instance_id = "fuzz-claimed-1" if own == "A" else "authz-b-1"
        snapshot = lambda ctx: read_instance_row(ctx, instance_id)  # noqa: E731
        return [
            # API.md: claimed by another customer is ALREADY_EXISTS, a wrong code PERMISSION_DENIED;
            # retrying one's own claim with its code is a no-op. Either way the owner stays.
            Row(
                f"{own}'s instance, its pairing code",
                _claim(own),
                by_tenant(
                    own,
                    customer=Ok(instance_of(own)),
                    ep=ROLE,
                    other_customer=Err(Code.ALREADY_EXISTS, "INSTANCE_ALREADY_CLAIMED"),
                    other_ep=ROLE,
                ),
                snapshot=snapshot,
            ),
            Row(
                f"{own}'s instance, a wrong pairing code",
                _claim(own, code="WRONG-0000"),
                by_tenant(
                    own,
                    # Even the owner's retry needs the right code (API.md: a wrong code is PERMISSION_DENIED).
                    customer=Err(Code.PERMISSION_DENIED, "INVALID_PAIRING_CODE"),
                    ep=ROLE,
                    other_customer=Err(Code.PERMISSION_DENIED, "INVALID_PAIRING_CODE"),
                    other_ep=ROLE,
                ),
                snapshot=snapshot,
            ),
        ]

    def get(own: str) -> list[Row]:
        # EPs never see instances, not even one they hold a permission on.
        return [
            Row(
                f"{own}'s instance",
                lambda ctx, caller: instance_pb2.GetInstanceRequest(name=ctx.tenant(own).instance),
                by_tenant(
                    own,
                    customer=Ok(instance_of(own)),
                    ep=nf("INSTANCE_NOT_FOUND"),
                    other_customer=nf("INSTANCE_NOT_FOUND"),
                    other_ep=nf("INSTANCE_NOT_FOUND"),
                ),
                ghost=lambda ctx, caller: instance_pb2.GetInstanceRequest(name=GHOST_INSTANCE),
            )
        ]

    unclaimed = "fuzz-unclaimed-1"
    return {
        "InstanceService.RegisterInstance": [
            Row("a new instance id (public)", _register(""), everyone(Ok(registered_unclaimed))),
            *both(register),
        ],
        "InstanceService.ClaimInstance": [
            *both(claim),
            Row(
                "an unclaimed instance, a wrong pairing code",
                lambda ctx, caller: instance_pb2.ClaimInstanceRequest(
                    instance_id=unclaimed, pairing_code="WRONG-0000"
                ),
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: Err(Code.PERMISSION_DENIED, "INVALID_PAIRING_CODE"),
                    CUSTOMER_B: Err(Code.PERMISSION_DENIED, "INVALID_PAIRING_CODE"),
                    EP_A: ROLE,
                    EP_B: ROLE,
                },
                snapshot=lambda ctx: read_instance_row(ctx, unclaimed),
            ),
            Row(
                "an unknown instance id",
                lambda ctx, caller: instance_pb2.ClaimInstanceRequest(
                    instance_id="no-such-instance", pairing_code="ABCDEF-123"
                ),
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: nf("INSTANCE_NOT_FOUND"),
                    CUSTOMER_B: nf("INSTANCE_NOT_FOUND"),
                    EP_A: ROLE,
                    EP_B: ROLE,
                },
            ),
        ],
        "InstanceService.GetInstance": [
            *both(get),
            Row(
                "an unclaimed instance",
                lambda ctx, caller: instance_pb2.GetInstanceRequest(name=f"instances/{unclaimed}"),
                signed_in(nf("INSTANCE_NOT_FOUND")),
                ghost=lambda ctx, caller: instance_pb2.GetInstanceRequest(name=GHOST_INSTANCE),
            ),
        ],
        "InstanceService.ListInstances": [
            Row(
                "the caller's instances",
                lambda ctx, caller: instance_pb2.ListInstancesRequest(),
                signed_in(Ok(own_instances)),
            ),
        ],
    }


def data_request_rows() -> dict[str, list[Row]]:
    def create(own: str) -> list[Row]:
        # Idempotency keys are per caller: reusing another EP's request_id creates one's own request.
        return [
            Row(
                f"replaying {own}'s request_id",
                lambda ctx, caller: data_request_pb2.CreateDataRequestRequest(
                    data_request=data_request_body(), request_id=ctx.tenant(own).dr_request_id
                ),
                by_tenant(
                    own,
                    customer=ROLE,
                    ep=Ok(replayed(own)),
                    other_customer=ROLE,
                    other_ep=Ok(created_by_caller),
                ),
            )
        ]

    def get(own: str) -> list[Row]:
        # API.md: GetDataRequest/ListDataRequests are for "anyone signed in": data requests are public.
        return [
            Row(
                f"{own}'s data request (public to the signed-in)",
                lambda ctx, caller: data_request_pb2.GetDataRequestRequest(name=ctx.tenant(own).data_request),
                signed_in(Ok(is_data_request(own))),
            )
        ]

    def list_owner(own: str) -> list[Row]:
        return [
            Row(
                f"browsing filtered to owner {own}",
                lambda ctx, caller: data_request_pb2.ListDataRequestsRequest(
                    owner=ctx.tenant(own).ep_name, page_size=100
                ),
                signed_in(Ok(lists_owned_by(own))),
            )
        ]

    def close(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s data request",
                lambda ctx, caller: data_request_pb2.CloseDataRequestRequest(name=ctx.tenant(own).close_me),
                by_tenant(own, customer=ROLE, ep=Ok(closed), other_customer=ROLE, other_ep=NOT_OWNER),
                snapshot=lambda ctx: read_data_request(ctx.tenant(own), ctx.tenant(own).close_me),
            )
        ]

    def search(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s data request",
                lambda ctx, caller: data_request_pb2.SearchInstancesRequest(
                    data_request=ctx.tenant(own).data_request, timeout=Duration(seconds=1)
                ),
                by_tenant(own, customer=ROLE, ep=Ok(searched(own)), other_customer=ROLE, other_ep=NOT_OWNER),
                snapshot=lambda ctx: read_search_count(ctx, ctx.tenant(own)),
            )
        ]

    def get_search(own: str) -> list[Row]:
        other = "B" if own == "A" else "A"
        ghost: Build = lambda ctx, caller: data_request_pb2.GetSearchRequest(  # noqa: E731
            name=f"{ctx.tenant(own).data_request}/searches/nosuchsearch"
        )
        return [
            Row(
                f"{own}'s search",
                lambda ctx, caller: data_request_pb2.GetSearchRequest(name=ctx.tenant(own).search),
                by_tenant(
                    own,
                    customer=nf("SEARCH_NOT_FOUND"),
                    ep=Ok(is_search(own)),
                    other_customer=nf("SEARCH_NOT_FOUND"),
                    other_ep=nf("SEARCH_NOT_FOUND"),
                ),
                ghost=ghost,
            ),
            # A search id under another data request's name is not found, for everyone.
            Row(
                f"{own}'s search id under {other}'s data request",
                lambda ctx, caller: data_request_pb2.GetSearchRequest(
                    name=ctx.tenant(other).data_request
                    + "/searches/"
                    + ctx.tenant(own).search.rsplit("/", 1)[1]
                ),
                signed_in(nf("SEARCH_NOT_FOUND")),
                ghost=ghost,
            ),
        ]

    return {
        "DataRequestService.CreateDataRequest": [
            Row(
                "a new data request",
                lambda ctx, caller: data_request_pb2.CreateDataRequestRequest(
                    data_request=data_request_body("Matrix")
                ),
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: ROLE,
                    CUSTOMER_B: ROLE,
                    EP_A: Ok(created_by_caller),
                    EP_B: Ok(created_by_caller),
                },
            ),
            *both(create),
        ],
        "DataRequestService.GetDataRequest": both(get),
        "DataRequestService.ListDataRequests": [
            Row(
                "browsing everything",
                lambda ctx, caller: data_request_pb2.ListDataRequestsRequest(page_size=100),
                signed_in(Ok(lists_both_tenants)),
            ),
            *both(list_owner),
        ],
        "DataRequestService.CloseDataRequest": both(close),
        "DataRequestService.SearchInstances": both(search),
        "DataRequestService.GetSearch": both(get_search),
    }


def _permission_rows(
    rpc_request: Callable[[str], Message],
    target: str,
    expect: Callable[[str], dict[str, Expect]],
    label: str,
) -> list[Row]:
    """Rows for a permission-naming RPC on tenant A's and B's `target` permission, with ghosts."""

    def make(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s {label}",
                lambda ctx, caller: rpc_request(getattr(ctx.tenant(own), target)),
                expect(own),
                snapshot=lambda ctx: read_permission(ctx.tenant(own), getattr(ctx.tenant(own), target)),
                ghost=lambda ctx, caller: rpc_request(GHOST_PERMISSION),
            )
        ]

    return both(make)


def access_rows() -> dict[str, list[Row]]:
    def request_access(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s data request and instance",
                lambda ctx, caller: access_request(ctx.tenant(own)),
                by_tenant(own, customer=ROLE, ep=Ok(requested(own)), other_customer=ROLE, other_ep=NOT_OWNER),
                snapshot=lambda ctx: read_permissions_of(ctx.tenant(own)),
            ),
            # Idempotency keys are per caller: another EP replaying A's request_id gets no A permissions.
            Row(
                f"replaying {own}'s request_id",
                lambda ctx, caller: access_request(ctx.tenant(own), ctx.tenant(own).access_request_id),
                by_tenant(
                    own, customer=ROLE, ep=Ok(replayed_access(own)), other_customer=ROLE, other_ep=NOT_OWNER
                ),
                snapshot=lambda ctx: read_permissions_of(ctx.tenant(own)),
            ),
        ]

    def get_permission(target: str, label: str) -> list[Row]:
        return _permission_rows(
            lambda name: access_pb2.GetPermissionRequest(name=name),
            target,
            lambda own: by_tenant(
                own,
                customer=Ok(is_permission(lambda ctx: getattr(ctx.tenant(own), target))),
                ep=Ok(is_permission(lambda ctx: getattr(ctx.tenant(own), target))),
                other_customer=nf("PERMISSION_NOT_FOUND"),
                other_ep=nf("PERMISSION_NOT_FOUND"),
            ),
            label,
        )

    def list_filtered(own: str) -> list[Row]:
        # Filtering by someone else's (public) data request is allowed and shows none of its permissions.
        return [
            Row(
                f"filtered to {own}'s data request",
                lambda ctx, caller: access_pb2.ListPermissionsRequest(
                    data_request=ctx.tenant(own).data_request
                ),
                signed_in(Ok(own_permissions(own))),
            )
        ]

    def list_page(own: str) -> list[Row]:
        # Page tokens are bound to the account that listed: nobody continues another's listing.
        invalid = Err(Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        return [
            Row(
                f"{own}'s EP's page token",
                lambda ctx, caller: access_pb2.ListPermissionsRequest(
                    page_size=1, page_token=ctx.tenant(own).permissions_page_token
                ),
                by_tenant(
                    own, customer=invalid, ep=Ok(page_continues), other_customer=invalid, other_ep=invalid
                ),
            )
        ]

    def watch(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s data request",
                lambda ctx, caller: access_pb2.WatchPermissionsRequest(
                    data_request=ctx.tenant(own).data_request
                ),
                by_tenant(own, customer=ROLE, ep=Ok(watched(own)), other_customer=ROLE, other_ep=NOT_OWNER),
            )
        ]

    return {
        "AccessService.RequestAccess": both(request_access),
        "AccessService.GetPermission": get_permission("pending", "pending permission")
        + get_permission("accepted", "accepted permission"),
        "AccessService.ListPermissions": [
            Row(
                "the caller's permissions",
                lambda ctx, caller: access_pb2.ListPermissionsRequest(),
                signed_in(Ok(own_permissions())),
            ),
            *both(list_filtered),
            *both(list_page),
        ],
        "AccessService.WatchPermissions": [
            Row(
                "the caller's permissions",
                lambda ctx, caller: access_pb2.WatchPermissionsRequest(),
                {ANON: UNAUTH, CUSTOMER_A: ROLE, CUSTOMER_B: ROLE, EP_A: Ok(watched()), EP_B: Ok(watched())},
            ),
            *both(watch),
        ],
        "AccessService.TerminatePermission": _permission_rows(
            lambda name: access_pb2.TerminatePermissionRequest(name=name, reason="no longer needed"),
            "terminate_me",
            lambda own: by_tenant(
                own,
                customer=ROLE,
                ep=Ok(in_state(Permission.STATE_TERMINATED)),
                other_customer=ROLE,
                other_ep=nf("PERMISSION_NOT_FOUND"),
            ),
            "accepted permission",
        ),
    }


def consent_rows() -> dict[str, list[Row]]:
    def connect_decision(own: str) -> list[Row]:
        return [
            Row(
                f"a decision on {own}'s pending permission",
                lambda ctx, caller: [
                    consent_pb2.ConnectRequest(
                        decision=consent_pb2.Decision(permission=ctx.tenant(own).connect_me, approve=False)
                    )
                ],
                by_tenant(
                    own,
                    customer=Ok(decided_on_stream(own)),
                    ep=ROLE,
                    # In band: the stream stays open and the decision gets DecideAccess's NOT_FOUND.
                    other_customer=Ok(refused_on_stream(own), inband_refusal=True),
                    other_ep=ROLE,
                ),
                snapshot=lambda ctx: read_permission(ctx.tenant(own), ctx.tenant(own).connect_me),
                ghost=lambda ctx, caller: [
                    consent_pb2.ConnectRequest(decision=consent_pb2.Decision(permission=GHOST_PERMISSION))
                ],
            )
        ]

    def activities(own: str) -> list[Row]:
        return [
            Row(
                f"{own}'s instance",
                lambda ctx, caller: consent_pb2.ListActivitiesRequest(instance=ctx.tenant(own).instance),
                by_tenant(
                    own,
                    customer=Ok(feed_of(own)),
                    ep=ROLE,
                    other_customer=nf("INSTANCE_NOT_FOUND"),
                    other_ep=ROLE,
                ),
                ghost=lambda ctx, caller: consent_pb2.ListActivitiesRequest(instance=GHOST_INSTANCE),
            )
        ]

    return {
        "ConsentService.Connect": [
            Row(
                "the caller's consent channel",
                lambda ctx, caller: [],
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: Ok(consent_channel),
                    CUSTOMER_B: Ok(consent_channel),
                    EP_A: ROLE,
                    EP_B: ROLE,
                },
            ),
            *both(connect_decision),
        ],
        "ConsentService.DecideAccess": _permission_rows(
            lambda name: consent_pb2.DecideAccessRequest(permission=name, approve=False, reason="no thanks"),
            "decide_me",
            lambda own: by_tenant(
                own,
                customer=Ok(in_state(Permission.STATE_REJECTED)),
                ep=ROLE,
                other_customer=nf("PERMISSION_NOT_FOUND"),
                other_ep=ROLE,
            ),
            "pending permission",
        ),
        "ConsentService.ListActivities": both(activities),
        "ConsentService.ListConsentReceipts": [
            Row(
                "the caller's chain",
                lambda ctx, caller: consent_pb2.ListConsentReceiptsRequest(page_size=500),
                {
                    ANON: UNAUTH,
                    CUSTOMER_A: Ok(own_receipts),
                    CUSTOMER_B: Ok(own_receipts),
                    EP_A: ROLE,
                    EP_B: ROLE,
                },
            )
        ],
        # The one ConsentService RPC open to eligible parties: a permission's EP may prove its consent.
        "ConsentService.GetConsentReceipt": _permission_rows(
            lambda name: consent_pb2.GetConsentReceiptRequest(permission=name),
            "accepted",
            lambda own: by_tenant(
                own,
                customer=Ok(receipt_of(own)),
                ep=Ok(receipt_of(own)),
                other_customer=nf("CONSENT_RECEIPT_NOT_FOUND"),
                other_ep=nf("CONSENT_RECEIPT_NOT_FOUND"),
            ),
            "accepted permission",
        )
        + _permission_rows(
            lambda name: consent_pb2.GetConsentReceiptRequest(permission=name),
            "pending",
            lambda own: {**signed_in(nf("CONSENT_RECEIPT_NOT_FOUND"))},
            "undecided permission",
        ),
        "ConsentService.RevokePermission": _permission_rows(
            lambda name: consent_pb2.RevokePermissionRequest(name=name, reason="changed my mind"),
            "revoke_me",
            lambda own: by_tenant(
                own,
                customer=Ok(in_state(Permission.STATE_REVOKED)),
                ep=ROLE,
                other_customer=nf("PERMISSION_NOT_FOUND"),
                other_ep=ROLE,
            ),
            "accepted permission",
        ),
    }


MATRIX: dict[str, list[Row]] = {
    **identity_rows(),
    **instance_rows(),
    **data_request_rows(),
    **access_rows(),
    **consent_rows(),
}
