"""Workflow 2 for customers: `eddie instances claim|list`."""

from __future__ import annotations

import click

from eddie.marketplace.v1 import instance_pb2
from eddie_cli import output
from eddie_cli.app import Options, cli, common_options, run
from eddie_cli.connection import SignedIn, signed_in

STATE = instance_pb2.Instance.State
PAGE_SIZE = 500


def instance_row(instance: instance_pb2.Instance) -> list[str]:
    return [
        instance.instance_id,
        output.enum_label(STATE.Name(instance.state), "STATE_"),
        "yes" if instance.connected else "no",
        instance.address,
        output.when(instance.last_seen_time),
    ]


async def all_instances(me: SignedIn) -> list[instance_pb2.Instance]:
    method, request = me.connection.instances.ListInstances, instance_pb2.ListInstancesRequest()
    found, _ = await me.pages(method, request, lambda page: page.instances, page_size=PAGE_SIZE)
    return found


@cli.group()
def instances() -> None:
    """Your AIIDAs: claim one with its pairing code, list the ones you own."""


@instances.command("claim")
@click.argument("instance_id")
@click.option("--pairing-code", required=True, help="the code the AIIDA prints (or shows on its label)")
@common_options
@click.pass_obj
def claim(options: Options, instance_id: str, pairing_code: str) -> None:
    """Claim the AIIDA INSTANCE_ID as yours (customers)."""

    async def work() -> None:
        async with options.connect() as connection:
            me = signed_in(connection)
            request = instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code=pairing_code)
            instance = await me.call(connection.instances.ClaimInstance, request)
            if options.json:
                output.print_json(instance)
            else:
                claimed = output.escape(instance.instance_id)
                output.say(f"Claimed [bold]{claimed}[/] ({output.escape(instance.name)}).")

    run(work())


@instances.command("list")
@common_options
@click.pass_obj
def list_instances(options: Options) -> None:
    """List the AIIDAs you own and whether the marketplace is connected to each."""

    async def work() -> None:
        async with options.connect() as connection:
            found = await all_instances(signed_in(connection))
            if options.json:
                output.print_json(instance_pb2.ListInstancesResponse(instances=found))
                return
            output.print_table(
                "Your AIIDAs",
                ["instance", "state", "connected", "address", "last seen (UTC)"],
                (instance_row(i) for i in found),
                empty="You have no AIIDA yet; claim one with `eddie instances claim ID --pairing-code CODE`.",
            )

    run(work())
