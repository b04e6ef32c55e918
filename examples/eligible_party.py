"""An eligible party: publish a data request, search the AIIDAs, ask for access, watch permissions.

    python examples/eligible_party.py --marketplace 127.0.0.1:50051 --email ep@example.org \\
        --password '...' --sink grpc://127.0.0.1:50061 [--region AT] [--watch-until ACTIVE]
"""

from __future__ import annotations

import argparse
import asyncio

from eddie.marketplace.v1 import access_pb2
from eddie_client import ROLE_ELIGIBLE_PARTY, MarketplaceClient, Session, data_need


async def watch(ep: Session, data_request: str, until: int, count: int) -> None:
    """Prints every permission transition until `count` permissions reached state `until` (or ended)."""
    reached: set[str] = set()
    call = ep.access.WatchPermissions(
        access_pb2.WatchPermissionsRequest(data_request=data_request), metadata=ep.metadata
    )
    try:
        async for event in call:
            p = event.permission
            print(f"{p.name} ({p.instance_id}): {access_pb2.Permission.State.Name(p.state)} {p.state_reason}")
            if p.state == until or p.state not in (
                access_pb2.Permission.STATE_PENDING,
                access_pb2.Permission.STATE_ACCEPTED,
            ):
                reached.add(p.name)
            if len(reached) >= count:
                return
    finally:
        call.cancel()


async def main(args: argparse.Namespace) -> None:
    async with MarketplaceClient(args.marketplace) as mp:
        ep = await mp.sign_up(ROLE_ELIGIBLE_PARTY, args.email, args.password, args.name)
        regions = [args.region] if args.region else []
        request = await ep.create_data_request(
            title=args.title,
            purpose="Example study of household consumption",
            need=data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, args.duration, regions),
        )
        print(f"created {request.name}")
        matches, summary = await ep.search(request.name, timeout=3)
        print(
            f"search: {summary.matched} of {summary.queried} match {sorted(matches)} "
            f"(unreachable {summary.unreachable}, timed out {summary.timed_out})"
        )
        if not matches:
            return
        permissions = await ep.request_access(request.name, matches, args.sink)
        for p in permissions:
            print(f"asked {p.instance_id}: {p.name} {access_pb2.Permission.State.Name(p.state)}")
        until = access_pb2.Permission.State.Value(f"STATE_{args.watch_until}")
        await watch(ep, request.name, until, len(permissions))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--marketplace", default="127.0.0.1:50051", help="marketplace HOST:PORT")
    parser.add_argument("--email", required=True, help="the EP's e-mail")
    parser.add_argument("--password", required=True, help="the EP's password (12+ characters)")
    parser.add_argument("--name", default="Example Research", help="display name when signing up")
    parser.add_argument("--title", default="Household consumption study", help="data request title")
    parser.add_argument("--region", default="", help="ISO 3166 region the request is for, e.g. AT")
    parser.add_argument("--duration", type=float, default=3600, help="access duration, seconds")
    parser.add_argument("--sink", required=True, help="the EP's data sink, grpc://HOST:PORT")
    parser.add_argument("--watch-until", default="ACTIVE", help="permission state to wait for")
    asyncio.run(main(parser.parse_args()))
