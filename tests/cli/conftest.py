"""Live servers for the CLI tests: a marketplace, an EP sink and two AIIDAs, as real processes.

One cast per test module (starting processes is the slow part); every test signs up people
with e-mail addresses of its own, so tests in a module do not see each other's accounts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eddie_client import procs
from tests.cli.eddie import Person

PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"
_people = itertools.count()


@dataclass
class Marketplace:
    marketplace: procs.Proc
    work: Path

    def person(self, name: str) -> Person:
        """A new CLI user with a config dir of their own."""
        return Person(self.work / f"home-{name}-{next(_people)}", self.marketplace.address)


@dataclass
class Cast(Marketplace):
    sink: procs.Proc
    aiidas: dict[str, str]  # instance id -> pairing code


def start_cast(work: Path, *marketplace_flags: str) -> tuple[Cast, list[procs.Proc]]:
    started: list[procs.Proc] = []
    try:
        mp = procs.start_marketplace(work / "mp", work, *marketplace_flags)
        started.append(mp)
        sink = procs.start_sink(mp.address, work / "sink", work, name="sink")
        started.append(sink)
        aiidas = {}
        for who, profile in [("alice", "vienna-p1.toml"), ("bernd", "graz-gas.toml")]:
            code = f"{who.upper()}-2026"
            flags = ("--instance-id", f"aiida-{who}", "--pairing-code", code, "--time-scale", "60")
            started.append(
                procs.start_aiida(
                    mp.address, work / who, PROFILES / profile, work, *flags, name=f"aiida-{who}"
                )
            )
            aiidas[f"aiida-{who}"] = code
        return Cast(mp, work, sink, aiidas), started
    except BaseException:
        for p in started:
            p.stop()
        raise


@pytest.fixture(scope="module")
def cast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cast]:
    running, started = start_cast(tmp_path_factory.mktemp("cli"))
    try:
        yield running
    finally:
        for p in started:
            p.stop()


@pytest.fixture(scope="module")
def lone_marketplace(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Marketplace]:
    """Only a marketplace (flags from the module's MARKETPLACE_FLAGS), for tests without AIIDAs."""
    work = tmp_path_factory.mktemp("cli-mp")
    flags = getattr(request.module, "MARKETPLACE_FLAGS", ())
    mp = procs.start_marketplace(work / "mp", work, *flags)
    try:
        yield Marketplace(mp, work)
    finally:
        mp.stop()
