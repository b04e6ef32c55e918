"""A link that is connecting never hangs: a peer that never finishes the HTTP/2 handshake, or a
re-registration that cancels the call being opened, ends in a retry, not a stream stuck for good.

(grpc.aio's first `write` waits for the call's initial metadata to be sent; a call cancelled or
stalled before that waited forever. Found with a 10,000-instance fleet restarted at a new port:
a handful of instances were never reconnected.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from eddie.energy.v1 import energy_pb2
from eddie_common.retry import Backoff
from eddie_common.tokens import SigningKey, TokenIssuer
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.config import Config
from marketplace_server.db.session import create_engine, create_sessionmaker, migrate
from tests.support.aiida_double import start_aiida
from tests.support.expect import eventually


async def _manager(tmp_path: Path) -> tuple[AsyncEngine, ConnectionManager]:
    """A connection manager on a fresh SQLite database (dispose of the engine when done)."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await migrate(engine)
    issuer = TokenIssuer(SigningKey.load_or_create(tmp_path / "key.pem"), "test")
    return engine, ConnectionManager(Config(), issuer, create_sessionmaker(engine))


async def _silent_peer() -> tuple[asyncio.Server, str]:
    """Accepts TCP connections and never says a word (no HTTP/2 SETTINGS)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("connect_timeout", [0.5, 30.0])
async def test_a_link_opening_to_a_silent_peer_moves_on_to_the_new_address(
    tmp_path: Path, connect_timeout: float
) -> None:
    """Within the connect timeout or not: re-registering ends the opening at once (a call cancelled
    before its first write got out would otherwise wait for the whole timeout)."""
    engine, manager = await _manager(tmp_path)
    manager.connect_timeout = connect_timeout
    silent, silent_address = await _silent_peer()
    aiida = await start_aiida()
    try:
        manager.link("inst-1", silent_address)
        await asyncio.sleep(0.2)  # the link is now inside its first write to the silent peer
        assert not manager.is_connected("inst-1")
        manager.link("inst-1", aiida.address)  # the instance re-registered elsewhere
        await eventually(lambda: manager.is_connected("inst-1"), 8)
        assert aiida.double.connected("inst-1")
    finally:
        await manager.stop()
        await aiida.stop()
        silent.close()
        with contextlib.suppress(Exception):
            await silent.wait_closed()
        await engine.dispose()


async def test_writes_abandoned_when_streams_break_leave_no_unretrieved_errors(tmp_path: Path) -> None:
    """Stopping with writes in flight (a replica stopping under search load) must not flood the log
    with asyncio's "Future exception was never retrieved", one per stream."""
    loop = asyncio.get_running_loop()
    unhandled: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(str(context.get("message"))))
    engine, manager = await _manager(tmp_path)
    aiida = await start_aiida()
    ids = [f"inst-{i}" for i in range(60)]
    try:
        for instance_id in ids:
            manager.link(instance_id, aiida.address)
        await eventually(lambda: all(manager.is_connected(i) for i in ids), 10)
        for _ in range(20):  # queue writes on every stream
            manager.begin_search(energy_pb2.DataNeed())
        assert aiida.server is not None
        await aiida.server.stop(None)  # the streams break with writes in flight
        await manager.stop()
        await asyncio.sleep(0.3)
        gc.collect()
        await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(previous)
        await aiida.stop()
        await engine.dispose()
    assert not [m for m in unhandled if "never retrieved" in m]


class _Caller:
    """Stands for the principal of the RPC that claimed the instance."""


async def test_a_link_does_not_keep_the_caller_of_the_rpc_that_started_it(tmp_path: Path) -> None:
    """A link is started inside the RPC that claimed its instance; it must not hold that RPC's
    context (the caller's principal) for as long as the stream lives, nor act as that caller."""
    import contextvars
    import weakref

    caller_var: contextvars.ContextVar[object | None] = contextvars.ContextVar("caller", default=None)
    engine, manager = await _manager(tmp_path)
    aiida = await start_aiida()
    try:
        caller = _Caller()
        gone = weakref.ref(caller)

        async def claim_rpc(who: _Caller) -> None:
            caller_var.set(who)
            manager.link("inst-1", aiida.address)

        await asyncio.create_task(claim_rpc(caller))
        del caller
        await eventually(lambda: manager.is_connected("inst-1"), 8)
        gc.collect()
        assert gone() is None, "the connected link keeps the claiming RPC's caller alive"
    finally:
        await manager.stop()
        await aiida.stop()
        await engine.dispose()


@pytest.mark.parametrize("io", ["core", "public"])
async def test_an_open_stream_searches_reports_and_reconnects_through_either_io_path(
    tmp_path: Path, io: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open stream's messages go through grpc.aio's core call (`_core_of`), or through the call's
    public write/read should a grpc release no longer have it: both search (every reply tallied,
    several queries queued behind each other), carry statuses, and reconnect when the stream ends."""
    from marketplace_server.aiida import link as link_module

    if io == "public":
        monkeypatch.setattr(link_module, "_core_of", link_module._PublicIO)
    engine, manager = await _manager(tmp_path)
    manager.reconnect_backoff = Backoff(initial=0.05, cap=0.1)
    statuses: list[tuple[str, str]] = []
    manager.status_listeners.append(
        lambda instance_id, status: statuses.append((instance_id, status.permission_id))
    )
    aiida = await start_aiida()
    ids = [f"inst-{i}" for i in range(6)]
    aiida.double.matches.update({i: n % 2 == 0 for n, i in enumerate(ids)})
    try:
        for instance_id in ids:
            manager.link(instance_id, aiida.address)
        await eventually(lambda: all(manager.is_connected(i) for i in ids), 10)
        kind = type(manager.links[ids[0]]._core).__name__
        assert (kind == "_PublicIO") == (io == "public"), kind
        tallies = [manager.begin_search(energy_pb2.DataNeed()) for _ in range(5)]  # queued writes
        await eventually(lambda: all(t.closed for t in tallies), 10)
        for tally in tallies:
            assert sorted(tally.matched_ids) == ["inst-0", "inst-2", "inst-4"]
            assert (tally.matched, tally.not_matched, tally.unreachable) == (3, 3, 0)
            manager.end_search(tally)
        await aiida.double.push_status("inst-1", "perm-1", 2)
        await eventually(lambda: bool(statuses), 5)
        assert statuses == [("inst-1", "perm-1")]
        assert aiida.server is not None
        await aiida.stop()  # every stream ends
        await eventually(lambda: not any(manager.is_connected(i) for i in ids), 5)
        aiida = await start_aiida(aiida.double)  # back (at a new port): re-registered
        for instance_id in ids:
            manager.link(instance_id, aiida.address)
        await eventually(lambda: all(manager.is_connected(i) for i in ids), 10)
        tally = manager.begin_search(energy_pb2.DataNeed())
        await eventually(lambda: tally.closed, 10)
        assert tally.matched == 3 and tally.not_matched == 3
    finally:
        await manager.stop()
        await aiida.stop()
        await engine.dispose()
