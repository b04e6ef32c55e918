"""Fixtures: real processes for end-to-end tests, a marketplace, an EP sink and two AIIDAs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from eddie_client import procs
from tests.support.cast import PROFILES, Cast


@pytest.fixture
def cast(tmp_path: Path) -> Iterator[Cast]:
    started: list[procs.Proc] = []
    try:
        mp = procs.start_marketplace(tmp_path / "mp", tmp_path)
        started.append(mp)
        sink = procs.start_sink(mp.address, tmp_path / "sink", tmp_path, name="sink")
        started.append(sink)
        aiidas = {}
        for who, profile in [("alice", "vienna-p1.toml"), ("bernd", "graz-gas.toml")]:
            code = f"{who.upper()}-2026"
            p = procs.start_aiida(
                mp.address,
                tmp_path / who,
                PROFILES / profile,
                tmp_path,
                *("--instance-id", f"aiida-{who}", "--pairing-code", code, "--time-scale", "60"),
                name=f"aiida-{who}",
            )
            started.append(p)
            aiidas[who] = (p, code)
        yield Cast(mp, sink, aiidas)
    finally:
        for p in started:
            p.stop()
