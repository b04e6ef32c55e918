"""The marketplace dies mid-work. SIGKILLed while customers approve: after a restart on the same data
directory no accepted decision is lost or duplicated, every approving AIIDA holds each permission once,
and readings reach the sink, unique. Gone while an AIIDA handles its ConfigureDataAccess: the access
still starts its data flow."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import access_pb2
from eddie_client import procs
from eddie_client.client import (
    ROLE_CUSTOMER,
    ROLE_ELIGIBLE_PARTY,
    MarketplaceClient,
    Session,
    data_need,
    list_readings,
)
from eddie_common.interceptors import error_info
from eddie_common.tokens import AUDIENCE_AIIDA, SigningKey, TokenIssuer
from tests.support.arena import PROFILES, DataAccess, Permission
from tests.support.expect import eventually
from tests.support.fleet import start_aiida
from tests.support.marketplace import PASSWORD, start_marketplace, test_config

# --- 2. the marketplace is SIGKILLed while customers approve ---


@pytest.mark.slow
@pytest.mark.e2e
async def test_a_marketplace_killed_while_customers_approve_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "mp"
    started: list[procs.Proc] = []

    def marketplace(port: int) -> procs.Proc:
        flags = ("--claim-rate", "1000", "--grace-period", "1")
        return procs.start_marketplace(data_dir, tmp_path, *flags, listen=f"127.0.0.1:{port}")

    mp = await asyncio.to_thread(marketplace, 0)
    started.append(mp)
    client = MarketplaceClient(mp.address)
    try:
        sink = await asyncio.to_thread(procs.start_sink, mp.address, tmp_path / "sink", tmp_path, name="sink")
        started.append(sink)
        stubs = {}
        for who, profile in (("alice", "vienna-p1.toml"), ("bernd", "graz-gas.toml")):
            flags = (
                "--instance-id",
                f"aiida-{who}",
                "--pairing-code",
                f"{who.upper()}-2026",
                "--time-scale",
                "60",
            )
            stubs[who] = await asyncio.to_thread(
                procs.start_aiida,
                mp.address,
                tmp_path / who,
                PROFILES / profile,
                tmp_path,
                *flags,
                name=f"aiida-{who}",
            )
            started.append(stubs[who])
        ep = await client.sign_up(ROLE_ELIGIBLE_PARTY, "ep@faults.example", PASSWORD, "Fault Research")
        customers = {}
        for who in stubs:
            customers[f"aiida-{who}"] = session = await client.sign_up(
                ROLE_CUSTOMER, f"{who}@faults.example", PASSWORD, who.title()
            )
            await session.claim(f"aiida-{who}", f"{who.upper()}-2026", wait=10)
        for session in customers.values():
            await eventually(lambda s=session: _all_connected(s), 10, "the AIIDAs connected")

        # Three data requests, each matched by both AIIDAs: six permissions, all pending.
        need = data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 86400, ["AT"])
        permissions: list[access_pb2.Permission] = []
        for n in range(3):
            request = await ep.create_data_request(f"Study {n}", "Resilience", need)
            matches, _ = await ep.search(request.name, timeout=3)
            assert sorted(matches) == ["aiida-alice", "aiida-bernd"]
            permissions += await ep.request_access(request.name, matches, f"grpc://{sink.address}")
        assert len(permissions) == 6

        # Every customer approves everything at once; the marketplace dies as soon as half the answers
        # are back: the other decisions are anywhere between not received and committed, and the
        # configure calls of the committed ones anywhere between not sent and acknowledged.
        async def approve(p: access_pb2.Permission) -> access_pb2.Permission:
            return await customers[p.instance_id].decide(p.name, True)

        decisions = [asyncio.create_task(approve(p)) for p in permissions]
        for answered, _ in enumerate(asyncio.as_completed(decisions), 1):
            await _
            if answered == len(decisions) // 2:
                break
        mp.popen.send_signal(signal.SIGKILL)
        outcomes = await asyncio.gather(*decisions, return_exceptions=True)
        accepted = {
            p.name: o for p, o in zip(permissions, outcomes, strict=True) if not isinstance(o, BaseException)
        }
        assert accepted, "no decision came back before the kill"
        assert all(o.state == Permission.STATE_ACCEPTED for o in accepted.values())
        await asyncio.to_thread(mp.popen.wait, 10)
        assert mp.popen.returncode == -signal.SIGKILL

        # Same port, same data directory; the AIIDAs and the sink keep running.
        mp = await asyncio.to_thread(marketplace, mp.port)
        started.append(mp)
        for p in permissions:
            state = (await ep.get_permission(p.name)).state
            if p.name in accepted:  # an answered decision survived the kill
                assert state in (Permission.STATE_ACCEPTED, Permission.STATE_ACTIVE), (p.name, state)
        # The customers' apps retry what got no answer: applied once, or applied now.
        for p, outcome in zip(permissions, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                retried = await _approve_again(customers[p.instance_id], p.name)
                if isinstance(retried, grpc.aio.AioRpcError):  # it was decided before the kill
                    info = error_info(retried)
                    assert retried.code() == grpc.StatusCode.FAILED_PRECONDITION, retried
                    assert info is not None and info.reason == "PERMISSION_ALREADY_DECIDED", info
                else:
                    assert retried.state == Permission.STATE_ACCEPTED

        async def all_active() -> bool:
            states = [(await ep.get_permission(p.name)).state for p in permissions]
            return all(s == Permission.STATE_ACTIVE for s in states)

        await eventually(all_active, 20, "every permission active")
        # None lost, none duplicated: each data request still has its two permissions, and an answered
        # decision kept its time (it was not decided a second time).
        for p in permissions:
            now = await ep.get_permission(p.name)
            if p.name in accepted:
                assert now.decide_time == accepted[p.name].decide_time
        listed = []
        for data_request in {p.data_request for p in permissions}:
            page = await ep.access.ListPermissions(
                access_pb2.ListPermissionsRequest(data_request=data_request, page_size=100),
                metadata=ep.metadata,
            )
            assert sorted(x.instance_id for x in page.permissions) == ["aiida-alice", "aiida-bernd"]
            listed += [x.name for x in page.permissions]
        assert sorted(listed) == sorted(p.name for p in permissions)

        # Each AIIDA holds each of its permissions exactly once, configured exactly once.
        issuer = TokenIssuer(SigningKey.load_or_create(data_dir / "signing-key.pem"))
        for who, stub in stubs.items():
            instance = f"aiida-{who}"
            mine = sorted(
                p.name.removeprefix("permissions/") for p in permissions if p.instance_id == instance
            )
            token, _ = issuer.issue(f"instances/{instance}", AUDIENCE_AIIDA, 60)
            async with grpc.aio.insecure_channel(stub.address) as channel:
                held = await aiida_pb2_grpc.AiidaServiceStub(channel).ListDataAccesses(
                    aiida_pb2.ListDataAccessesRequest(),
                    metadata=(("authorization", f"Bearer {token}"), ("aiida-instance-id", instance)),
                )
            assert sorted(a.permission_id for a in held.data_accesses) == mine
            assert {a.state for a in held.data_accesses} == {DataAccess.STATE_ACTIVE}
            log = (tmp_path / f"aiida-{who}.log").read_text()
            for permission_id in mine:
                configured = [
                    line
                    for line in log.splitlines()
                    if "event=data_access_state" in line
                    and f"permission={permission_id} " in line
                    and "state=STATE_ACTIVE" in line
                ]
                mentions = [line for line in log.splitlines() if permission_id in line]
                assert len(configured) == 1, (
                    f"{instance} configured {permission_id} {len(configured)} times: {mentions}"
                )

        # Readings reach the sink, at least once and stored once per (permission, tag, time).
        for p in permissions:
            permission_id = p.name.removeprefix("permissions/")

            async def readings(pid: str = permission_id) -> list[Any]:
                return await list_readings(sink.address, pid, ep.token)

            got = await eventually(readings, 15, f"readings of {permission_id}")
            keys = [(r.permission_id, r.data_tag, r.time.ToNanoseconds()) for r in got]
            assert len(keys) == len(set(keys)), f"duplicate readings for {permission_id}"
            assert {r.permission_id for r in got} == {permission_id}
            assert {r.data_tag for r in got} == {"1-0:1.8.0"}
        # Nothing is left to deliver.
        with sqlite3.connect(data_dir / "marketplace.db") as db:
            assert db.execute("SELECT count(*) FROM outbox WHERE done = 0").fetchone() == (0,)
    finally:
        await client.channel.close()
        for proc in reversed(started):
            proc.stop()


class RecordingSink(data_sink_pb2_grpc.DataSinkServiceServicer):
    """A data sink that accepts every reading and counts them per permission."""

    def __init__(self) -> None:
        self.readings: Counter[str] = Counter()

    async def Publish(self, request_iterator: Any, context: Any) -> data_sink_pb2.PublishResponse:  # type: ignore[override]
        accepted = 0
        async for request in request_iterator:
            self.readings[request.reading.permission_id] += 1
            accepted += 1
        return data_sink_pb2.PublishResponse(accepted=accepted)

    async def ListReadings(self, request: Any, context: Any) -> data_sink_pb2.ListReadingsResponse:  # type: ignore[override]
        return data_sink_pb2.ListReadingsResponse()


async def test_a_configure_cut_off_mid_call_still_starts_the_data_flow(tmp_path: Path) -> None:
    """The marketplace dies while an AIIDA handles its ConfigureDataAccess; the call is cancelled. The
    access must not end up stored as ACTIVE yet never streamed (the redelivery finds it and returns it)."""
    market = await start_marketplace(test_config(tmp_path))
    recorder = RecordingSink()
    sink = grpc.aio.server()
    data_sink_pb2_grpc.add_DataSinkServiceServicer_to_server(recorder, sink)
    sink_port = sink.add_insecure_port("127.0.0.1:0")
    await sink.start()
    aiida = await start_aiida(market, tmp_path, "cut-box", PROFILES / "vienna-p1.toml", time_scale=60.0)
    try:
        now = time.time()

        def configure(permission_id: str) -> aiida_pb2.ConfigureDataAccessRequest:
            access = aiida_pb2.DataAccess(
                permission_id=permission_id,
                data_need=data_need("ELECTRICITY", ["1-0:1.8.0"], 60, 900, 0, 3600, ["AT"]),
                sink_uri=f"grpc://127.0.0.1:{sink_port}",
                sink_token="recorded-not-checked",
            )
            access.start_time.FromSeconds(int(now))
            access.end_time.FromSeconds(int(now) + 3600)
            return aiida_pb2.ConfigureDataAccessRequest(data_access=access)

        # Deterministic: the handler is cancelled at its first wait, as gRPC cancels it when the peer dies.
        instance = aiida.app.instances["cut-box"]
        handler = asyncio.create_task(instance.configure_access(configure("cut-direct")))
        await asyncio.sleep(0)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        # Over gRPC: calls cancelled by the caller after a range of delays, some mid-way.
        token, _ = market.app.issuer.issue("instances/cut-box", AUDIENCE_AIIDA, 60)
        metadata = (("authorization", f"Bearer {token}"), ("aiida-instance-id", "cut-box"))
        delays = [0.0, 0.001, 0.002, 0.003, 0.005, 0.008, 0.013, 0.021]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{aiida.port}") as channel:
            stub = aiida_pb2_grpc.AiidaServiceStub(channel)
            for n, delay in enumerate(delays):
                call = stub.ConfigureDataAccess(configure(f"cut-rpc-{n}"), metadata=metadata)
                await asyncio.sleep(delay)
                call.cancel()
            # The marketplace comes back and redelivers every configure: each is ACTIVE and streams.
            ids = ["cut-direct", *(f"cut-rpc-{n}" for n in range(len(delays)))]
            for permission_id in ids:
                access = await stub.ConfigureDataAccess(configure(permission_id), metadata=metadata)
                assert access.state == DataAccess.STATE_ACTIVE, (permission_id, access.state)

        async def all_streaming() -> bool:
            return all(recorder.readings[i] > 0 for i in ids)

        await eventually(all_streaming, 10, f"readings of every access: {dict(recorder.readings)}")
    finally:
        await aiida.app.stop(0)
        await sink.stop(0)
        await market.channel.close()
        await market.app.stop(0)


async def _approve_again(customer: Session, name: str) -> access_pb2.Permission | grpc.aio.AioRpcError:
    try:
        return await customer.decide(name, True)
    except grpc.aio.AioRpcError as err:
        return err


async def _all_connected(session: Session) -> bool:
    return all(i.connected for i in await session.list_instances())
