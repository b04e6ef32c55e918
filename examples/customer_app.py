"""A customer's app: log in, claim an AIIDA, browse data requests, answer access requests live.

    python examples/customer_app.py --marketplace 127.0.0.1:50051 --email alice@example.org \\
        --password '...' --instance-id aiida-alice --pairing-code K7MX-3QPA [--approve | --reject] [--max 1]

Signs up first if the account does not exist. Exits after deciding `--max` access requests.
"""

from __future__ import annotations

import argparse
import asyncio

from eddie.marketplace.v1 import access_pb2, consent_pb2
from eddie_client import ROLE_CUSTOMER, MarketplaceClient, Session


async def answer_access_requests(me: Session, approve: bool, limit: int) -> list[access_pb2.Permission]:
    """Shows each access request like a consent screen and decides it on the live stream."""
    decided: list[access_pb2.Permission] = []
    call = me.consent.Connect(metadata=me.metadata)
    try:
        async for message in call:
            kind = message.WhichOneof("event")
            if kind == "access_request":
                request = message.access_request
                need = request.data_request.data_need
                print(f"access request {request.permission.name} for {request.permission.instance_id}:")
                print(f"  '{request.data_request.title}' by {request.data_request.owner_display_name}")
                print(f"  purpose: {request.data_request.purpose}")
                print(f"  data: {list(need.data_tags)} for {need.duration.ToTimedelta()}")
                await call.write(
                    consent_pb2.ConnectRequest(
                        decision=consent_pb2.Decision(
                            permission=request.permission.name,
                            approve=approve,
                            reason="" if approve else "not interested",
                        )
                    )
                )
            elif kind == "permission_update":
                permission = message.permission_update
                state = access_pb2.Permission.State.Name(permission.state)
                print(f"permission {permission.name} is now {state}")
                if permission.state != access_pb2.Permission.STATE_PENDING:
                    decided.append(permission)
                    if len(decided) >= limit:
                        return decided
            elif kind == "decision_error":
                print(f"decision failed: {message.decision_error.reason} {message.decision_error.message}")
    finally:
        call.cancel()
    return decided


async def main(args: argparse.Namespace) -> None:
    async with MarketplaceClient(args.marketplace) as mp:
        me = await mp.sign_up(ROLE_CUSTOMER, args.email, args.password, args.name)
        if args.instance_id:
            instance = await me.claim(args.instance_id, args.pairing_code, wait=30)
            print(f"claimed {instance.name} (connected: {instance.connected})")
        page = await me.browse(region=args.region, page_size=10)
        print(f"{page.total_size} open data requests for region {args.region or 'any'}:")
        for r in page.data_requests:
            print(f"  {r.name}: {r.title} by {r.owner_display_name}")
        if args.max > 0:
            await answer_access_requests(me, approve=not args.reject, limit=args.max)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--marketplace", default="127.0.0.1:50051", help="marketplace HOST:PORT")
    parser.add_argument("--email", required=True, help="the customer's e-mail")
    parser.add_argument("--password", required=True, help="the customer's password (12+ characters)")
    parser.add_argument("--name", default="A household", help="display name when signing up")
    parser.add_argument("--instance-id", default="", help="AIIDA instance to claim")
    parser.add_argument("--pairing-code", default="", help="the pairing code the AIIDA printed")
    parser.add_argument("--region", default="", help="browse filter, e.g. AT-9")
    parser.add_argument("--reject", action="store_true", help="reject access requests instead of approving")
    parser.add_argument("--max", type=int, default=1, help="decide this many access requests, then exit")
    asyncio.run(main(parser.parse_args()))
