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

from eddie.energy.v1 import energy_pb2
from eddie_common.tokens import SigningKey, TokenIssuer
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.config import Config
from marketplace_server.db.session import create_engine, create_sessionmaker, migrate
from tests.support.aiida_double import start_aiida


async def _silent_peer() -> tuple[asyncio.Server, str]:
    """Accepts TCP connections and never says a word (no HTTP/2 SETTINGS)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_link_opening_to_a_silent_peer_moves_on_to_the_new_address(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await migrate(engine)
    issuer = TokenIssuer(SigningKey.load_or_create(tmp_path / "key.pem"), "test")
    manager = ConnectionManager(Config(), issuer, create_sessionmaker(engine))
    manager.connect_timeout = 0.5
    silent, silent_address = await _silent_peer()
    aiida = await start_aiida()
    try:
        manager.link("inst-1", silent_address)
        await asyncio.sleep(0.2)  # the link is now inside its first write to the silent peer
        assert not manager.is_connected("inst-1")
        manager.link("inst-1", aiida.address)  # the instance re-registered elsewhere
        async with asyncio.timeout(8):
            while not manager.is_connected("inst-1"):
                await asyncio.sleep(0.05)
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
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await migrate(engine)
    issuer = TokenIssuer(SigningKey.load_or_create(tmp_path / "key.pem"), "test")
    manager = ConnectionManager(Config(), issuer, create_sessionmaker(engine))
    aiida = await start_aiida()
    ids = [f"inst-{i}" for i in range(60)]
    try:
        for instance_id in ids:
            manager.link(instance_id, aiida.address)
        async with asyncio.timeout(10):
            while not all(manager.is_connected(i) for i in ids):
                await asyncio.sleep(0.05)
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
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await migrate(engine)
    issuer = TokenIssuer(SigningKey.load_or_create(tmp_path / "key.pem"), "test")
    manager = ConnectionManager(Config(), issuer, create_sessionmaker(engine))
    aiida = await start_aiida()
    try:
        caller = _Caller()
        gone = weakref.ref(caller)

        async def claim_rpc(who: _Caller) -> None:
            caller_var.set(who)
            manager.link("inst-1", aiida.address)

        await asyncio.create_task(claim_rpc(caller))
        del caller
        async with asyncio.timeout(8):
            while not manager.is_connected("inst-1"):
                await asyncio.sleep(0.05)
        gc.collect()
        assert gone() is None, "the connected link keeps the claiming RPC's caller alive"
    finally:
        await manager.stop()
        await aiida.stop()
        await engine.dispose()
