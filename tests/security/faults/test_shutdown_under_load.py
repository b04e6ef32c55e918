"""Stop and SIGTERM under load: in-flight calls finish, health goes NOT_SERVING, new calls are refused,
the process exits 0 within the grace period."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from eddie.marketplace.v1 import data_request_pb2, identity_pb2, identity_pb2_grpc
from eddie_client import procs
from marketplace_server.server import Marketplace
from tests.support.arena import HONEST, Arena, arena_config, assert_exact, build_arena, health_of
from tests.support.expect import eventually
from tests.support.hostile_aiida import HostileAiida, Script, Silent
from tests.support.marketplace import PASSWORD, start_marketplace

# --- 4. graceful shutdown under load ---


@dataclass
class Load:
    """Work in flight at one marketplace: unary calls that take real work, and open streams."""

    unary: list[asyncio.Task[tuple[float, grpc.StatusCode]]]  # when each call ended, and how
    search: asyncio.Task[tuple[list[str], data_request_pb2.SearchSummary, float]]
    health: Any  # grpc.health.v1 Health.Watch
    consent: Any  # the owner's ConsentService.Connect


async def _ended(call: Any) -> tuple[float, grpc.StatusCode]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return time.monotonic(), err.code()
    return time.monotonic(), grpc.StatusCode.OK


async def start_load(arena: Arena, calls: int = 24) -> Load:
    """`calls` account creations and `calls` logins (argon2: slow on purpose, so they queue up), a
    search of 2 s that waits for a silent instance, a health watch and a customer's consent stream."""
    identity = arena.owner.identity
    assert arena.owner.account is not None
    login = identity_pb2.CreateTokenRequest(email=arena.owner.account.email, password=PASSWORD)
    unary = []
    for _ in range(calls):
        create = identity_pb2.CreateAccountRequest(
            email=f"load-{secrets.token_hex(6)}@example.org",
            password=PASSWORD,
            display_name="Load",
            role=identity_pb2.ROLE_CUSTOMER,
        )
        unary.append(asyncio.create_task(_ended(identity.CreateAccount(create))))
        unary.append(asyncio.create_task(_ended(identity.CreateToken(login))))
    health = health_of(arena.channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
    consent = arena.owner.consent.Connect(metadata=arena.owner.metadata)
    opening: Any = None
    while opening is None or not opening.HasField("ready"):
        opening = await consent.read()
    search = asyncio.create_task(arena.search(timeout=2.0))
    await asyncio.sleep(0.3)  # every call is on the wire
    return Load(unary, search, health, consent)


async def assert_drained(
    load: Load, signalled: float, grace: float, address: str
) -> list[tuple[float, grpc.StatusCode]]:
    """Health said NOT_SERVING, new calls are refused, the search and the streams ended properly.
    Returns how each unary call ended (when, and its code)."""
    update = await asyncio.wait_for(load.health.read(), 2.0)
    assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING, update
    async with grpc.aio.insecure_channel(address) as fresh:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await identity_pb2_grpc.IdentityServiceStub(fresh).CreateToken(
                identity_pb2.CreateTokenRequest(email="late@example.org", password=PASSWORD), timeout=2.0
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    ended = await asyncio.wait_for(asyncio.gather(*load.unary), grace + 2)
    assert any(t > signalled and code == grpc.StatusCode.OK for t, code in ended), (
        "no call finished after the signal: nothing was in flight, the test proves nothing"
    )
    matches, summary, _ = await asyncio.wait_for(load.search, grace + 2)
    assert_exact(matches, summary, hostile=1, timed_out=1)  # ran to its end: matches, summary and all
    # A long-lived stream is ended by the server (not left hanging) by the end of the grace period.
    stream_end = None
    try:
        async with asyncio.timeout(grace + 2):
            while await load.consent.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as err:
        stream_end = err.code()
    assert stream_end in (None, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), stream_end
    return ended


def count_started(app: Marketplace, gate: asyncio.Event | None = None) -> Counter[str]:
    """Counts the identity calls the server has begun to handle (the real service does the work).

    With `gate`, a call that has begun waits for it before doing its work: the test holds calls
    inside the server until the stop has begun, so on a fast machine they cannot all be over
    before it (they were, now and then, and the test then had nothing in flight to drain)."""
    identity = app.identity
    started: Counter[str] = Counter()
    for name in ("create_account", "login"):
        real = getattr(identity, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            started[_name] += 1
            if gate is not None:
                await gate.wait()
            return await _real(*args)

        setattr(identity, name, counted)
    return started


async def test_stop_under_load_drains_in_flight_calls_and_refuses_new_ones(tmp_path: Path) -> None:
    """The in-process path: Marketplace.stop(grace) with calls and streams in flight."""
    grace = 3.0
    honest = await HostileAiida({**{i: Script(m) for i, m in HONEST.items()}, "silent-box": Silent()}).start()
    market = await start_marketplace(arena_config(tmp_path, grace_period=grace))
    try:
        arena = await build_arena(market.channel, market.address, market.app, honest)
        await arena.add(honest, "silent-box")
        gate = asyncio.Event()
        started = count_started(market.app, gate)
        load = await start_load(arena)

        # Client and server share this loop: under a busy machine the server may not have picked up
        # any call 0.3 s in. Stop only once calls are really running inside the server.
        async def in_flight() -> bool:
            return started.total() - sum(task.done() for task in load.unary) >= 2

        try:
            await eventually(in_flight, 10, "calls running inside the server", step=0.005)
        except AssertionError as exc:  # say what the calls did instead
            ended_early = Counter(task.result()[1].name for task in load.unary if task.done())
            raise AssertionError(f"{exc}; started {dict(started)}, ended {dict(ended_early)}") from None
        signalled = time.monotonic()
        stopping = asyncio.create_task(market.app.stop())
        await asyncio.sleep(0.05)  # the stop has begun with the calls inside the server
        gate.set()
        ended = await assert_drained(load, signalled, grace, market.address)
        await asyncio.wait_for(stopping, grace + 5)
        assert time.monotonic() - signalled < grace + 5
        # Client and server share this event loop, so a call may still wait in gRPC's queue, sent but not
        # yet handed to the server, when the stop begins; gRPC refuses those. Every call the server had
        # begun must have finished.
        codes = Counter(code for _, code in ended)
        assert codes[grpc.StatusCode.OK] == started.total(), (codes, started)
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}, (
            codes
        )
    finally:
        await market.channel.close()
        await market.app.stop(0)
        await honest.stop()


@pytest.mark.slow
async def test_sigterm_under_load_drains_and_exits_zero(tmp_path: Path) -> None:
    """The real process: SIGTERM with calls and streams in flight; exit 0 within grace + a few seconds."""
    grace = 4.0
    honest = await HostileAiida({**{i: Script(m) for i, m in HONEST.items()}, "silent-box": Silent()}).start()
    flags = ("--grace-period", str(grace), "--claim-rate", "1000", "--search-rate", "1000")
    mp = await asyncio.to_thread(procs.start_marketplace, tmp_path / "mp", tmp_path, *flags)
    channel = grpc.aio.insecure_channel(mp.address)
    try:
        arena = await build_arena(channel, mp.address, None, honest)
        await arena.add(honest, "silent-box")
        load = await start_load(arena)
        signalled = time.monotonic()
        mp.popen.send_signal(signal.SIGTERM)
        ended = await assert_drained(load, signalled, grace, mp.address)
        failed = [(round(t - signalled, 2), code.name) for t, code in ended if code != grpc.StatusCode.OK]
        assert not failed, f"in-flight calls failed (seconds after SIGTERM, code): {failed}"
        code = await asyncio.to_thread(mp.popen.wait, grace + 5)
        exited = time.monotonic() - signalled
        assert code == 0, f"exit code {code}: {mp.lines[-10:]}"
        assert exited < grace + 5, f"exited {exited:.1f}s after SIGTERM"
    finally:
        await channel.close()
        mp.kill()
        await honest.stop()
