"""`make demo`: the whole story, end to end, with real processes on free ports.

Starts a marketplace (SQLite), four AIIDAs with different household profiles
and an EP data sink, then drives the six workflows through the generated stubs
and narrates them. When Mosquitto answers on 127.0.0.1:1883 the sink also
subscribes to it and one more permission is delivered over MQTT on EDDIE's AIIDA
topics (otherwise the demo says it skipped that step). Exits non-zero if any
step fails; stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, instance_pb2
from eddie_client import procs, receipts
from eddie_client.client import (
    ROLE_CUSTOMER,
    ROLE_ELIGIBLE_PARTY,
    MarketplaceClient,
    Session,
    data_need,
    list_readings,
)
from eddie_client.demo_cli import CommandLine

PROFILES = Path(__file__).resolve().parent.parent / "aiida_stub" / "profiles"
PASSWORD = "demo passphrase for the marketplace"
HOUSEHOLDS = [
    ("alice", "Alice (Vienna, P1 smart meter)", "vienna-p1.toml"),
    ("bernd", "Bernd (Graz, gas heating)", "graz-gas.toml"),
    ("clara", "Clara (Bavaria, heat pump with PV)", "germany-heatpump.toml"),
    ("dana", "Dana (hydrogen pilot)", "hydrogen-pilot.toml"),
]
STATE = access_pb2.Permission.State
MQTT_BROKER = ("127.0.0.1", 1883)


@dataclass
class Story:
    """What happened, for the closing table."""

    steps: list[tuple[str, str]] = field(default_factory=list)

    def step(self, workflow: str, text: str) -> None:
        self.steps.append((workflow, text))
        print(f"  [{workflow}] {text}", flush=True)


def heading(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


@dataclass
class Cast:
    marketplace: procs.Proc
    sink: procs.Proc
    aiidas: dict[str, tuple[procs.Proc, str, str]]  # who -> (process, instance id, pairing code)
    mqtt_url: str | None = None  # the broker the sink subscribes to, if one answers

    def all(self) -> list[procs.Proc]:
        return [self.marketplace, self.sink, *(p for p, _, _ in self.aiidas.values())]


def broker_answers(address: tuple[str, int] = MQTT_BROKER) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


def start_cast(work: Path, time_scale: float) -> Cast:
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    mp = procs.start_marketplace(work / "marketplace", logs)
    started = [mp]
    mqtt_url = "mqtt://{}:{}".format(*MQTT_BROKER) if broker_answers() else None
    try:
        flags = ["--jsonl", str(work / "readings.jsonl")]
        if mqtt_url is not None:
            flags += ["--mqtt-url", mqtt_url]
        sink = procs.start_sink(mp.address, work / "sink", logs, *flags)
        started.append(sink)
        aiidas = {}
        for who, _, profile in HOUSEHOLDS:
            p = procs.start_aiida(
                mp.address,
                work / f"aiida-{who}",
                PROFILES / profile,
                logs,
                *("--instance-id", f"aiida-{who}", "--time-scale", str(time_scale)),
                name=f"aiida-{who}",
            )
            started.append(p)
            code = p.wait_for(r"pairing code: (\S+)", 10).group(1)
            aiidas[who] = (p, f"aiida-{who}", code)
        return Cast(mp, sink, aiidas, mqtt_url)
    except BaseException:
        for p in started:
            p.stop()
        raise


async def accounts(mp: MarketplaceClient, story: Story) -> tuple[Session, dict[str, Session]]:
    heading("Workflow 1: accounts at the IAM")
    ep = await mp.sign_up(
        ROLE_ELIGIBLE_PARTY, "research@energy-institute.example", PASSWORD, "Energy Institute Vienna"
    )
    story.step("W1", f"eligible party {ep.account.display_name} signed up ({ep.account.name})")
    customers = {}
    for who, label, _ in HOUSEHOLDS:
        customers[who] = await mp.sign_up(ROLE_CUSTOMER, f"{who}@household.example", PASSWORD, label)
    story.step("W1", f"{len(customers)} customers signed up and logged in (access + refresh tokens)")
    return ep, customers


async def claim_all(cast: Cast, customers: dict[str, Session], story: Story) -> None:
    heading("Workflow 2: AIIDAs register themselves, owners claim them")
    for who, (_, instance_id, code) in cast.aiidas.items():
        instance = await customers[who].claim(instance_id, code)
        story.step(
            "W2", f"{customers[who].account.display_name} claimed {instance_id} with pairing code {code}"
        )
        assert instance.state == instance_pb2.Instance.STATE_CLAIMED
    deadline = time.monotonic() + 15
    for who, session in customers.items():
        while not all(i.connected for i in await session.list_instances()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{who}'s AIIDA did not connect")
            await asyncio.sleep(0.1)
    story.step("W2", "the marketplace holds a live Connect stream to every claimed AIIDA")


async def publish(ep: Session, story: Story) -> data_request_pb2.DataRequest:
    heading("Workflow 4: the eligible party publishes a data request and a data service")
    request = await ep.create_data_request(
        title="Austrian household load profiles",
        description="Quarter-hourly import energy of Austrian households for a grid-planning study.",
        purpose="Grid planning research; data is deleted after the study.",
        need=data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 3600, ["AT"]),
        policy_uri="https://energy-institute.example/privacy",
    )
    story.step("W4", f"data request '{request.title}' ({request.name})")
    service = await ep.create_data_request(
        title="Heat-pump optimiser",
        description="Schedules your heat pump around PV surplus.",
        purpose="Optimise heat-pump operation",
        need=data_need("ELECTRICITY", ["1-0:1.8.0", "1-0:2.8.0"], 60, 900, 0, 30 * 86400, ["DE"]),
        kind=data_request_pb2.DataRequest.KIND_DATA_SERVICE,
    )
    story.step("W4", f"data service '{service.title}' ({service.name})")
    return request


async def browse(alice: CommandLine, story: Story) -> None:
    heading("Workflow 3: a customer browses with a filter (on the command line)")
    await alice.show("data-requests", "list", "--region", "AT-9")
    page = await alice.json("data-requests", "list", "--region", "AT-9")
    titles = [r["title"] for r in page["dataRequests"]]
    story.step("W3", f"Alice filtered by region AT-9: {titles} (total {page['totalSize']})")
    assert "Austrian household load profiles" in titles and "Heat-pump optimiser" not in titles


async def search(ep: CommandLine, request: data_request_pb2.DataRequest, story: Story) -> list[str]:
    heading("Workflow 5: the eligible party searches; each AIIDA answers match / no match")
    found = await ep.json("search", request.name, "--timeout", "3")
    matches: list[str] = found["matchedInstanceIds"]
    summary = found["summary"]
    story.step("W5", f"matches: {sorted(matches)}")
    story.step(
        "W5",
        f"summary: queried {summary['queried']}, matched {summary['matched']}, not matched "
        f"{summary['notMatched']}, unreachable {summary['unreachable']}, timed out "
        f"{summary['timedOut']}, {summary.get('elapsed', '0s')}",
    )
    assert sorted(matches) == ["aiida-alice", "aiida-bernd"], matches
    return matches


async def _watch(ep: Session, request_name: str, seen: list[tuple[str, str]], stop: asyncio.Event) -> None:
    call = ep.access.WatchPermissions(
        access_pb2.WatchPermissionsRequest(data_request=request_name), metadata=ep.metadata
    )
    stopper = asyncio.create_task(stop.wait())
    try:
        while True:
            read = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({read, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                read.cancel()
                return
            event = read.result()
            if not isinstance(event, access_pb2.PermissionEvent):
                return
            p = event.permission
            seen.append((p.instance_id, STATE.Name(p.state)))
            print(
                f"      EP notified: {p.instance_id} is {STATE.Name(p.state)}"
                + (f" ({p.state_reason})" if p.state_reason else ""),
                flush=True,
            )
    finally:
        call.cancel()
        stopper.cancel()


async def _consent(customer: Session, approve: bool, decided: asyncio.Event, story: Story) -> None:
    """The customer's app: live stream, shows the consent screen, decides."""
    call = customer.consent.Connect(metadata=customer.metadata)
    try:
        while True:
            message = await call.read()
            if not isinstance(message, consent_pb2.ConnectResponse):
                return
            kind = message.WhichOneof("event")
            if kind == "access_request":
                r = message.access_request
                story.step(
                    "W6",
                    f"{customer.account.display_name}'s app shows: '{r.data_request.title}' by "
                    f"{r.data_request.owner_display_name}, purpose '{r.data_request.purpose}'",
                )
                await call.write(
                    consent_pb2.ConnectRequest(
                        decision=consent_pb2.Decision(
                            permission=r.permission.name,
                            approve=approve,
                            reason="" if approve else "I do not share data for research",
                        )
                    )
                )
            elif kind == "permission_update" and message.permission_update.state != STATE.STATE_PENDING:
                p = message.permission_update
                story.step("W6", f"{customer.account.display_name} decided: {STATE.Name(p.state)}")
                decided.set()
                return
            elif kind == "decision_error":
                raise RuntimeError(f"decision failed: {message.decision_error.message}")
    finally:
        call.cancel()


async def _wait_for_readings(sink: str, permission_id: str, token: str, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = len(await list_readings(sink, permission_id, token))
        if count >= at_least:
            return count
        await asyncio.sleep(0.2)
    raise RuntimeError(f"fewer than {at_least} readings for {permission_id} within {timeout}s")


async def access(
    cast: Cast,
    ep: Session,
    customers: dict[str, Session],
    request: data_request_pb2.DataRequest,
    matches: list[str],
    clis: dict[str, CommandLine],
    story: Story,
) -> None:
    heading("Workflow 6: access requests, consent on the customers' apps, data to the EP's sink")
    seen: list[tuple[str, str]] = []
    stop_watch = asyncio.Event()
    watcher = asyncio.create_task(_watch(ep, request.name, seen, stop_watch))
    decided = {who: asyncio.Event() for who in ("alice", "bernd")}
    apps = [
        asyncio.create_task(_consent(customers["alice"], True, decided["alice"], story)),
        asyncio.create_task(_consent(customers["bernd"], False, decided["bernd"], story)),
    ]
    await asyncio.sleep(0.3)  # the apps are connected and waiting
    permissions = await ep.request_access(request.name, matches, f"grpc://{cast.sink.address}")
    story.step("W6", f"EP asked for access: {[p.name for p in permissions]} (PENDING)")
    await asyncio.wait_for(asyncio.gather(*apps), 15)
    by_instance = {p.instance_id: p for p in permissions}
    alice_pid = by_instance["aiida-alice"].name.removeprefix("permissions/")
    bernd_pid = by_instance["aiida-bernd"].name.removeprefix("permissions/")
    token = ep.token
    count = await _wait_for_readings(cast.sink.address, alice_pid, token, 3, 20)
    story.step("W6", f"the sink received {count} readings for Alice's permission")
    assert not await list_readings(cast.sink.address, bernd_pid, token), "readings for a rejected permission"
    story.step("W6", "no reading for Bernd's rejected permission")
    revoked = await clis["alice"].json(
        "permissions", "revoke", by_instance["aiida-alice"].name, "--reason", "study long enough"
    )
    story.step("W6", f"Alice revoked on the command line: {revoked['state']}")
    await asyncio.sleep(1.5)
    before = len(await list_readings(cast.sink.address, alice_pid, token))
    await asyncio.sleep(2.0)
    after = len(await list_readings(cast.sink.address, alice_pid, token))
    story.step("W6", f"readings stopped after the revocation ({before} then {after} two seconds later)")
    assert after == before, "readings kept arriving after the revocation"
    stop_watch.set()
    await watcher
    story.step("W6", "EP's notifications: " + ", ".join(f"{i}:{s.removeprefix('STATE_')}" for i, s in seen))
    await clis["ep"].show("access", "list", request.name)


async def household_audit(alice: Session, instance_id: str, story: Story) -> None:
    """Alice reads what happened to her device, then checks her consent receipts offline."""
    heading("Trust: the household's activity feed and signed consent receipts")
    feed = await alice.consent.ListActivities(
        consent_pb2.ListActivitiesRequest(instance=f"instances/{instance_id}"), metadata=alice.metadata
    )
    kind = consent_pb2.Activity.Kind
    for a in reversed(feed.activities):
        what = "matched" if a.matched else "no match"
        detail = f"search, {what}" if a.kind == kind.KIND_SEARCH else a.permission
        story.step(
            "trust",
            f"{kind.Name(a.kind).removeprefix('KIND_')}: {a.eligible_party_display_name}, "
            f"'{a.purpose}' ({detail})",
        )
    chain = await alice.consent.ListConsentReceipts(
        consent_pb2.ListConsentReceiptsRequest(), metadata=alice.metadata
    )
    keys = await receipts.fetch_signing_keys(alice.identity)
    verified = receipts.verify_chain(chain.consent_receipts, keys)
    for line in receipts.chain_summary(verified):
        story.step("trust", f"receipt {line}")
    story.step("trust", f"{len(verified)} receipts: every signature and the hash chain verified offline")


async def mqtt_delivery(
    cast: Cast, ep: Session, alice: Session, request: data_request_pb2.DataRequest, story: Story
) -> None:
    heading("Workflow 6 over MQTT: EDDIE's AIIDA topics through Mosquitto")
    if cast.mqtt_url is None:
        print("  skipped: Mosquitto does not answer on 127.0.0.1:1883 (start it to see the MQTT data path)")
        return
    (permission,) = await ep.request_access(request.name, ["aiida-alice"], cast.mqtt_url)
    pid = permission.name.removeprefix("permissions/")
    story.step("W6", f"EP asked for access with sink {cast.mqtt_url}: {permission.name}")
    host, port = MQTT_BROKER
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(f"aiida/v1/{pid}/#", qos=1)  # what `mosquitto_sub -t 'aiida/v1/+/#'` shows
        await alice.decide(permission.name, True)
        story.step("W6", "Alice approved; her AIIDA connects to the broker as the permission")
        async with asyncio.timeout(20):
            async for message in client.messages:
                if "/data/outbound/" in message.topic.value and isinstance(message.payload, bytes):
                    story.step("W6", f"{message.topic.value}: {message.payload.decode()[:160]}")
                    break
        count = await _wait_for_readings(cast.sink.address, pid, ep.token, 2, 20)
        story.step("W6", f"the sink took {count} readings off the broker; the EP lists them (ListReadings)")
        command = json.dumps({"action": "TERMINATE", "permissionId": pid})
        await client.publish(f"aiida/v1/{pid}/command/terminate", command, qos=1)
        story.step("W6", f"EP published TERMINATE on aiida/v1/{pid}/command/terminate")
        async with asyncio.timeout(10):
            async for message in client.messages:
                if message.topic.value.endswith("/status") and isinstance(message.payload, bytes):
                    status = json.loads(message.payload)["status"]
                    if status != "ACTIVE":
                        story.step("W6", f"aiida/v1/{pid}/status: {status}")
                        break
    deadline = time.monotonic() + 10
    while (state := (await ep.get_permission(permission.name)).state) != STATE.STATE_TERMINATED:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the permission is {STATE.Name(state)}, not TERMINATED, after TERMINATE")
        await asyncio.sleep(0.1)
    story.step("W6", f"the marketplace's permission is {STATE.Name(state)}")


def print_table(story: Story) -> None:
    heading("What happened")
    counts: dict[str, int] = {}
    for workflow, _ in story.steps:
        counts[workflow] = counts.get(workflow, 0) + 1
    print(f"  {'workflow':<10}{'steps':>6}")
    for workflow in sorted(counts):
        print(f"  {workflow:<10}{counts[workflow]:>6}")
    print("\n  all six workflows completed successfully")


async def command_lines(cast: Cast, work: Path, story: Story) -> dict[str, CommandLine]:
    """The EP and Alice also sign in with `eddie`, each with a session of their own."""
    clis = {}
    for who, email in (("ep", "research@energy-institute.example"), ("alice", "alice@household.example")):
        clis[who] = CommandLine(cast.marketplace.address, work / f"eddie-{who}", PASSWORD)
        await clis[who].run("login", "--email", email)
    story.step("W1", "the EP and Alice signed in on the command line too (`eddie login`)")
    return clis


async def run_story(cast: Cast, work: Path) -> None:
    story = Story()
    async with MarketplaceClient(cast.marketplace.address) as mp:
        ep, customers = await accounts(mp, story)
        clis = await command_lines(cast, work, story)
        await claim_all(cast, customers, story)
        request = await publish(ep, story)
        await browse(clis["alice"], story)
        matches = await search(clis["ep"], request, story)
        await access(cast, ep, customers, request, matches, clis, story)
        await household_audit(customers["alice"], "aiida-alice", story)
        await clis["alice"].show("receipts", "verify")
        await mqtt_delivery(cast, ep, customers["alice"], request, story)
    print_table(story)


def print_poke_help(cast: Cast) -> None:
    m = cast.marketplace.address
    print(
        f"""
Servers are still running (Ctrl-C stops them):
  marketplace  {m}
  eddie-sink   {cast.sink.address}{f" (subscribed to {cast.mqtt_url})" if cast.mqtt_url else ""}
  AIIDAs       {", ".join(f"{iid}@{p.address}" for p, iid, _ in cast.aiidas.values())}
Try:
  .venv/bin/grpcurl -plaintext {m} list
  .venv/bin/grpcurl -plaintext {m} grpc.health.v1.Health/Check
  .venv/bin/grpcurl -plaintext -d '{{"email":"alice@household.example","password":"{PASSWORD}"}}' \\
      {m} eddie.marketplace.v1.IdentityService/CreateToken""",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep-running", action="store_true", help="leave the servers up after the story")
    parser.add_argument(
        "--time-scale", type=float, default=60.0, help="how much faster the simulated meters run"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where state and logs go (default: a temp dir)"
    )
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="eddie-demo-"))
    print(f"demo state and logs in {work}")
    cast = start_cast(work, args.time_scale)
    ok = False
    try:
        asyncio.run(run_story(cast, work))
        ok = True
        if args.keep_running:
            print_poke_help(cast)
            with contextlib.suppress(KeyboardInterrupt):
                cast.marketplace.popen.wait()
    except Exception as exc:
        print(f"\nDEMO FAILED: {type(exc).__name__}: {exc}\nlogs: {work / 'logs'}", file=sys.stderr)
    finally:
        for p in cast.all():
            p.stop()
        if ok and args.work_dir is None and not args.keep_running:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
