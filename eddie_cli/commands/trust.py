"""The trust features for customers: `eddie activity INSTANCE_ID`, `eddie receipts list|verify`."""

from __future__ import annotations

import base64
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click
from cryptography.hazmat.primitives.asymmetric import ec

from eddie.marketplace.v1 import consent_pb2, identity_pb2
from eddie_cli import output
from eddie_cli.app import Options, cli, common_options, run
from eddie_cli.connection import SignedIn, signed_in
from eddie_cli.describe import INSTANCES, permission_state, resource_name
from eddie_cli.errors import EXIT_FAILED, CliError
from eddie_common.tokens import ALGORITHM, load_public_key

KIND = consent_pb2.Activity.Kind
PAGE_SIZE = 500


def activity_row(activity: consent_pb2.Activity) -> list[str]:
    kind = output.enum_label(KIND.Name(activity.kind), "KIND_").replace("_", " ").lower()
    if activity.kind == KIND.KIND_SEARCH:
        outcome = "matched" if activity.matched else "not matched"
    else:
        outcome = permission_state(activity.state) if activity.state else ""
    if activity.reason:
        outcome = f"{outcome} ({activity.reason})".strip()
    return [
        output.when(activity.time),
        kind,
        activity.eligible_party_display_name,
        activity.purpose,
        outcome,
        activity.permission or activity.data_request,
    ]


@cli.command()
@click.argument("instance_id")
@click.option(
    "--limit", type=click.IntRange(1), default=200, show_default=True, help="at most this many entries"
)
@common_options
@click.pass_obj
def activity(options: Options, instance_id: str, limit: int) -> None:
    """What happened around your AIIDA INSTANCE_ID, newest first: every search it was asked
    (and whether it matched), every access request and every step of every permission."""

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = consent_pb2.ListActivitiesRequest(instance=resource_name(INSTANCES, instance_id))
            found, _ = await me.pages(
                connection.consent.ListActivities,
                request,
                lambda page: page.activities,
                page_size=PAGE_SIZE,
                limit=limit,
            )
            if options.json:
                output.print_json(consent_pb2.ListActivitiesResponse(activities=found))
                return
            output.print_table(
                f"Activity of {instance_id}",
                ["time (UTC)", "what", "eligible party", "purpose", "outcome", "permission / data request"],
                (activity_row(a) for a in found),
                empty="Nothing has happened around this AIIDA yet.",
            )

    run(work())


def receipt_claims(receipt: consent_pb2.ConsentReceipt) -> dict[str, Any]:
    """The JSON payload of a receipt's compact JWS, decoded without checking it (for display)."""
    try:
        payload = receipt.jws.split(".")[1]
        decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return decoded
    except (IndexError, ValueError):
        return {}


async def all_receipts(me: SignedIn) -> list[consent_pb2.ConsentReceipt]:
    method, request = me.connection.consent.ListConsentReceipts, consent_pb2.ListConsentReceiptsRequest()
    found, _ = await me.pages(method, request, lambda page: page.consent_receipts, page_size=PAGE_SIZE)
    return found


@cli.group()
def receipts() -> None:
    """Your signed consent receipts: one per approval, rejection and revocation, chained."""


@receipts.command("list")
@common_options
@click.pass_obj
def list_receipts(options: Options) -> None:
    """List your consent receipts, oldest first."""

    async def work() -> None:
        async with options.connect() as connection:
            found = await all_receipts(signed_in(connection))
            if options.json:
                output.print_json(consent_pb2.ListConsentReceiptsResponse(consent_receipts=found))
                return
            rows = []
            for receipt in found:
                claims = receipt_claims(receipt)
                rows.append(
                    [
                        str(receipt.sequence),
                        str(claims.get("time", "")),
                        str(claims.get("decision", "")),
                        receipt.permission,
                        str(claims.get("purpose", "")),
                    ]
                )
            output.print_table(
                "Consent receipts",
                ["#", "time", "decision", "permission", "purpose"],
                rows,
                empty="No consent receipt yet: you have not decided on any access request.",
            )

    run(work())


Verifier = Callable[[Sequence[consent_pb2.ConsentReceipt], Mapping[str, ec.EllipticCurvePublicKey]], object]


def load_verifier() -> Verifier:
    """eddie_client.receipts.verify_chain, imported only when verifying."""
    try:
        module = importlib.import_module("eddie_client.receipts")
        verifier: Verifier = module.verify_chain
    except (ImportError, AttributeError) as error:
        raise CliError(f"cannot verify: eddie_client.receipts.verify_chain is missing ({error})") from None
    return verifier


def public_keys(response: identity_pb2.ListSigningKeysResponse) -> dict[str, ec.EllipticCurvePublicKey]:
    """The marketplace's receipt-signing keys by `kid` (current and earlier ones)."""
    return {
        k.key_id: load_public_key(k.public_key_pem) for k in response.signing_keys if k.algorithm == ALGORITHM
    }


@receipts.command("verify")
@common_options
@click.pass_obj
def verify(options: Options) -> None:
    """Check every signature and the hash chain of your receipts offline with the marketplace's
    public keys. Exit status 1 on any break."""
    verify_chain = load_verifier()

    async def work() -> int:
        async with options.connect() as connection:
            me = signed_in(connection)
            found = await all_receipts(me)
            keys = await connection.call(
                connection.identity.ListSigningKeys, identity_pb2.ListSigningKeysRequest()
            )
        try:  # verify_chain raises at the first break (bad signature, broken link, wrong sequence)
            verify_chain(found, public_keys(keys))
            problems: list[str] = []
        except Exception as error:
            problems = [str(error) or type(error).__name__]
        if options.json:
            output.print_json({"verified": not problems, "receipts": len(found), "problems": problems})
        elif problems:
            for problem in problems:
                output.error(problem)
        else:
            output.say(
                f"[bold green]OK[/]: {len(found)} receipt(s), every signature and link of the chain verifies."
            )
        return EXIT_FAILED if problems else 0

    run(work())
