"""Transport abuse: garbage on the ports, idle connections, and clients that never read their streams.

The three programs run in-process on port 0 (a real marketplace, a real AIIDA
stub registered at it, a real EP sink fetching its keys from it). Raw TCP
clients then send what no gRPC client would; afterwards every program must
still answer health checks and normal calls promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiida_stub.server import AiidaApp
from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import access_pb2, data_request_pb2, identity_pb2, instance_pb2
from eddie_client.client import Session
from eddie_common import tokens
from eddie_sink.config import SinkConfig
from eddie_sink.server import SinkApp
from eddie_sink.server import create_server as create_sink
from tests.support.aiida_double import AiidaDouble
from tests.support.aiida_double import start_aiida as start_double
from tests.support.fleet import start_aiida
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config
from tests.support.world import SECRET, data_need

PROFILE = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles" / "vienna-p1.toml"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROMPT = 2.0  # seconds within which a normal call must answer while the abuse goes on
GARBAGE: dict[str, bytes] = {
    "nothing (connect and close)": b"",
    "random bytes": os.urandom(8192),
    "an HTTP/1.1 GET": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "an HTTP/1.1 POST to a gRPC path": (
        b"POST /eddie.marketplace.v1.IdentityService/CreateToken HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/grpc\r\nContent-Length: 5\r\n\r\nhello"
    ),
    "a truncated HTTP/2 preface": PREFACE[:11],
    "the preface then random frames": PREFACE + os.urandom(2048),
    "the preface then a frame claiming 16 MiB": PREFACE + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",
    "a TLS ClientHello to a plaintext port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
    "a zero-length line flood": b"\r\n" * 50_000,
}


@dataclass
class Programs:
    market: RunningMarketplace
    aiida: AiidaApp
    aiida_port: int
    aiida_id: str
    sink: SinkApp
    sink_port: int
    customer: Session

    @property
    def ports(self) -> dict[str, int]:
        return {"marketplace": self.market.port, "aiida-stub": self.aiida_port, "eddie-sink": self.sink_port}


@pytest.fixture
async def programs(tmp_path: Path) -> AsyncIterator[Programs]:
    market = await start_marketplace(test_config(tmp_path))
    aiida = await start_aiida(market, tmp_path, "abuse-aiida-1", PROFILE)
    sink_config = SinkConfig(marketplace=market.address, data_dir=tmp_path / "sink", grace_period=0.2)
    sink, sink_port = await create_sink(sink_config)
    assert await sink.keys.wait_ready(10)
    programs = Programs(
        market, aiida.app, aiida.port, aiida.instance_id, sink, sink_port, await market.customer()
    )
    yield programs
    await sink.stop(0)
    await aiida.app.stop(0)
    await market.channel.close()
    await market.app.stop(0)


async def _send_raw(port: int, payload: bytes) -> None:
    """Connects, sends `payload`, reads whatever comes back for a moment, and hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if payload:
            writer.write(payload)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(reader.read(65536), 0.3)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _prompt(call: Awaitable[Any], what: str) -> Any:
    start = time.monotonic()
    result = await asyncio.wait_for(call, PROMPT)
    assert time.monotonic() - start < PROMPT, what
    return result


async def assert_all_serving(p: Programs) -> None:
    """Health of all three, plus a real call to each, all answered promptly."""
    for name, port in p.ports.items():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=PROMPT
            )
            assert (await _prompt(health, name)).status == health_pb2.HealthCheckResponse.SERVING
            if name == "aiida-stub":
                token = p.market.app.issuer.issue(f"instances/{p.aiida_id}", tokens.AUDIENCE_AIIDA, 60)[0]
                metadata = (("authorization", f"Bearer {token}"), ("aiida-instance-id", p.aiida_id))
                stub = aiida_pb2_grpc.AiidaServiceStub(channel)
                await _prompt(
                    stub.ListDataAccesses(aiida_pb2.ListDataAccessesRequest(), metadata=metadata), name
                )
            if name == "eddie-sink":
                await _prompt(_sink_answers(channel, p), name)
    account = p.customer.identity.GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=p.customer.metadata
    )
    assert (await _prompt(account, "marketplace")).role == identity_pb2.ROLE_CUSTOMER


async def _sink_answers(channel: grpc.aio.Channel, p: Programs) -> None:
    token = p.market.app.issuer.issue(
        "accounts/ep", tokens.AUDIENCE_MARKETPLACE, 60, role="ROLE_ELIGIBLE_PARTY"
    )[0]
    stub = data_sink_pb2_grpc.DataSinkServiceStub(channel)
    call = stub.ListReadings(
        data_sink_pb2.ListReadingsRequest(permission_id="p-1"),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    code = await call.code()  # an answer is what counts, not its verdict
    assert code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), code


async def test_garbage_on_every_port_leaves_every_program_serving(programs: Programs) -> None:
    for garbage, payload in GARBAGE.items():
        for port in programs.ports.values():
            await asyncio.gather(*(_send_raw(port, payload) for _ in range(5)))
        try:
            await assert_all_serving(programs)
        except BaseException as exc:
            raise AssertionError(f"after {garbage}: {exc!r}") from exc


async def test_fifty_idle_connections_per_port_do_not_block_calls(programs: Programs) -> None:
    held: list[asyncio.StreamWriter] = []
    try:
        for port in programs.ports.values():
            for i in range(50):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 2:  # half of them stop in the middle of the HTTP/2 preface (slowloris)
                    writer.write(PREFACE[:9])
                    await writer.drain()
                held.append(writer)
        await asyncio.sleep(0.2)
        await assert_all_serving(programs)
    finally:
        for writer in held:
            writer.close()
    await assert_all_serving(programs)


# --- clients that open streams and never read them ---

ROUNDS = 5
INSTANCES = 24  # events per round, below the subscriber queue (a reading stream keeps up)
QUEUE = 40  # the event hub's per-stream queue for this test (1,000 in production)


async def _claim_many(market: RunningMarketplace, owner: Session, ids: list[str], address: str) -> None:
    for instance_id in ids:
        await market.client().instances.RegisterInstance(
            instance_pb2.RegisterInstanceRequest(
                instance_id=instance_id, address=address, instance_secret=SECRET, pairing_code="CODE-1234"
            )
        )
        await owner.instances.ClaimInstance(
            instance_pb2.ClaimInstanceRequest(instance_id=instance_id, pairing_code="CODE-1234"),
            metadata=owner.metadata,
        )
    manager = market.app.components["manager"]
    async with asyncio.timeout(10):
        while not all(manager.is_connected(i) for i in ids):
            await asyncio.sleep(0.01)


async def _searched_data_request(ep: Session) -> str:
    dr = await ep.data_requests.CreateDataRequest(
        data_request_pb2.CreateDataRequestRequest(
            data_request=data_request_pb2.DataRequest(
                title="Stalled streams", description="x" * 2000, purpose="p", data_need=data_need()
            )
        ),
        metadata=ep.metadata,
    )
    search = data_request_pb2.SearchInstancesRequest(data_request=dr.name, timeout=Duration(seconds=2))
    async for _ in ep.data_requests.SearchInstances(search, metadata=ep.metadata):
        pass
    return dr.name


async def _read_all(call: Any) -> None:
    async for _ in call:
        pass


async def _count(call: Any, seen: list[Any]) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        async for message in call:
            seen.append(message)


async def test_streams_that_are_never_read_do_not_hold_up_other_clients(tmp_path: Path) -> None:
    market = await start_marketplace(
        test_config(tmp_path, claim_attempts_per_minute=1e6, search_rate_per_minute=1e6)
    )
    double = await start_double(AiidaDouble())
    hub = market.app.components["events"]
    hub.queue_size = QUEUE
    stalled = grpc.aio.insecure_channel(
        market.address, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    )
    tasks: list[asyncio.Task[None]] = []
    try:
        slow_customer, other_customer, ep = (
            await market.customer(),
            await market.customer(),
            await market.eligible_party(),
        )
        ids = [f"stall-{i}" for i in range(INSTANCES)]
        double.double.matches.update({i: True for i in [*ids, "other-1"]})
        await _claim_many(market, slow_customer, ids, double.address)
        await _claim_many(market, other_customer, ["other-1"], double.address)
        # The abusers share one channel with a tiny flow-control window and never read.
        slow_c, slow_ep = Session(stalled, slow_customer.token), Session(stalled, ep.token)
        never_read = [
            slow_c.consent.Connect(metadata=slow_c.metadata),
            slow_ep.access.WatchPermissions(access_pb2.WatchPermissionsRequest(), metadata=slow_ep.metadata),
            slow_ep.data_requests.SearchInstances(
                data_request_pb2.SearchInstancesRequest(data_request=await _searched_data_request(ep)),
                metadata=slow_ep.metadata,
            ),
        ]
        # Well-behaved clients read everything on their own channel.
        watched: list[Any] = []
        other_seen: list[Any] = []
        tasks.append(
            asyncio.create_task(
                _count(
                    ep.access.WatchPermissions(access_pb2.WatchPermissionsRequest(), metadata=ep.metadata),
                    watched,
                )
            )
        )
        tasks.append(
            asyncio.create_task(
                _count(other_customer.consent.Connect(metadata=other_customer.metadata), other_seen)
            )
        )
        await asyncio.sleep(0.2)
        for round_ in range(ROUNDS):
            name = await _searched_data_request(ep)
            request = access_pb2.RequestAccessRequest(
                data_request=name, instance_ids=ids, sink_uri="grpc://127.0.0.1:1"
            )
            await _prompt(ep.access.RequestAccess(request, metadata=ep.metadata), "RequestAccess")
            async with asyncio.timeout(PROMPT):  # the reading watcher got this round's events at once
                while len(watched) < (round_ + 1) * INSTANCES:
                    await asyncio.sleep(0.005)
            listed = ep.data_requests.ListDataRequests(
                data_request_pb2.ListDataRequestsRequest(), metadata=ep.metadata
            )
            await _prompt(listed, "ListDataRequests")
        # The other customer still gets a new access request promptly.
        name = await _searched_data_request(ep)
        other = access_pb2.RequestAccessRequest(
            data_request=name, instance_ids=["other-1"], sink_uri="grpc://127.0.0.1:1"
        )
        await ep.access.RequestAccess(other, metadata=ep.metadata)
        async with asyncio.timeout(PROMPT):
            while not any(m.HasField("access_request") for m in other_seen):
                await asyncio.sleep(0.005)
        # The stalled consent and watch streams were cut off rather than buffered without bound.
        for call in never_read[:2]:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(_read_all(call), 10)
            assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ended.value
        never_read[2].cancel()
    finally:
        for task in tasks:
            task.cancel()
        await stalled.close()
        await market.channel.close()
        await market.app.stop(0)
        await double.stop()
