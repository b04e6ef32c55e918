"""An instance's last-seen time moves when the AIIDA answers, not when the marketplace pings it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from eddie_common.tokens import SigningKey, TokenIssuer
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.config import Config
from marketplace_server.db.models import InstanceRow
from marketplace_server.db.session import create_engine, create_sessionmaker, migrate

LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)


class _Link:
    """A connected link whose AIIDA answers pings (its reader bumps last_seen) or stays silent."""

    def __init__(self, instance_id: str, answers: bool) -> None:
        self.instance_id = instance_id
        self.connected = True
        self.last_seen = 0.0
        self.written = 0.0
        self.answers = answers
        self.pings = 0

    def ping(self) -> None:
        self.pings += 1
        if self.answers:
            self.last_seen = time.time()


async def test_a_ping_round_records_the_instances_that_answered_and_not_the_silent_ones(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await migrate(engine)
    sessions = create_sessionmaker(engine)
    async with sessions.begin() as session:
        for instance_id in ("answering", "silent"):
            session.add(
                InstanceRow(
                    instance_id=instance_id,
                    address="127.0.0.1:1",
                    secret_hash="x",
                    pairing_code_hash="x",
                    owner_id=None,
                    register_time=LONG_AGO,
                    claim_time=None,
                    last_seen_time=LONG_AGO,
                )
            )
    issuer = TokenIssuer(SigningKey.load_or_create(tmp_path / "key.pem"), "test")
    manager = ConnectionManager(Config(ping_interval=0.02), issuer, sessions)
    links: dict[str, Any] = {"answering": _Link("answering", True), "silent": _Link("silent", False)}
    manager.links.update(links)
    pinging = asyncio.create_task(manager._ping_forever())
    try:
        while links["silent"].pings < 3:  # the answer to round 1 is recorded in round 2
            await asyncio.sleep(0.02)
    finally:
        pinging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinging
    await manager._flush_last_seen()
    async with sessions() as session:
        seen = dict(
            (await session.execute(select(InstanceRow.instance_id, InstanceRow.last_seen_time))).all()
        )
    await engine.dispose()
    assert seen["answering"] > LONG_AGO
    assert seen["silent"] == LONG_AGO


async def test_a_stream_that_answered_since_the_last_round_is_not_pinged(tmp_path: Path) -> None:
    """Pings are for idle streams: one that answers searches all the time costs no pings."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await migrate(engine)
    issuer = TokenIssuer(SigningKey.load_or_create(tmp_path / "key.pem"), "test")
    manager = ConnectionManager(Config(ping_interval=0.02), issuer, create_sessionmaker(engine))
    busy, idle = _Link("busy", False), _Link("idle", True)
    manager.links.update({"busy": busy, "idle": idle})
    pinging = asyncio.create_task(manager._ping_forever())
    try:
        while idle.pings < 6:
            busy.last_seen = time.time()  # it answers a search now and then: always recently seen
            await asyncio.sleep(0.005)
    finally:
        pinging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinging
    await engine.dispose()
    assert busy.pings == 0
    assert "busy" in manager._seen


@pytest.mark.parametrize("write_every", [300.0, 0.0])
async def test_an_answering_instance_is_written_once_per_write_interval_not_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_every: float
) -> None:
    """At a million AIIDAs a write per instance per ping round would be 33,000 row updates a
    second: an instance that keeps answering is queued again only after LAST_SEEN_WRITE_SECONDS."""
    monkeypatch.setattr("marketplace_server.aiida.manager.LAST_SEEN_WRITE_SECONDS", write_every)
    issuer = TokenIssuer(SigningKey.load_or_create(tmp_path / "key.pem"), "test")
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    manager = ConnectionManager(Config(ping_interval=0.02), issuer, create_sessionmaker(engine))
    answering = _Link("answering", True)
    manager.links["answering"] = answering
    pinging = asyncio.create_task(manager._ping_forever())
    try:
        while "answering" not in manager._seen:  # queued once it answered a round
            await asyncio.sleep(0.01)
        manager._seen.clear()  # as a flush would
        pings = answering.pings
        while answering.pings < pings + 3:  # three more rounds, each answered
            await asyncio.sleep(0.01)
    finally:
        pinging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinging
        await engine.dispose()
    assert ("answering" in manager._seen) is (write_every == 0.0)
