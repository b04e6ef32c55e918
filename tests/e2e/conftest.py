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
    running: Cast | None = None
    try:
        mp = procs.start_marketplace(tmp_path / "mp", tmp_path)
        started.append(mp)
        people = [("alice", "vienna-p1.toml"), ("bernd", "graz-gas.toml")]

        def aiida(who: str, profile: str) -> procs.Proc:
            code = f"{who.upper()}-2026"
            return procs.start_aiida(
                mp.address,
                tmp_path / who,
                PROFILES / profile,
                tmp_path,
                *("--instance-id", f"aiida-{who}", "--pairing-code", code, "--time-scale", "60"),
                name=f"aiida-{who}",
            )

        # The sink and the AIIDAs need only the marketplace: they start together.
        sink, *aiida_procs = procs.start_all(
            [
                lambda: procs.start_sink(mp.address, tmp_path / "sink", tmp_path, name="sink"),
                *(lambda who=who, profile=profile: aiida(who, profile) for who, profile in people),
            ]
        )
        started += [sink, *aiida_procs]
        aiidas = {who: (p, f"{who.upper()}-2026") for (who, _), p in zip(people, aiida_procs, strict=True)}
        running = Cast(mp, sink, aiidas)
        yield running
    finally:
        # A test may replace a program (a sink restarted at a new port): the replacement is stopped too.
        if running is not None:
            started += [p for p in (running.marketplace, running.sink) if p not in started]
        procs.stop_all(started)
