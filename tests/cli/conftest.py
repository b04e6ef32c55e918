"""Fixtures: live servers for the CLI tests (a marketplace, an EP sink and two AIIDAs, as real
processes), one cast per test module; every test signs up people of its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eddie_client import procs
from tests.support.cli import Cast, Marketplace, start_cast


@pytest.fixture(scope="module")
def cast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cast]:
    running, started = start_cast(tmp_path_factory.mktemp("cli"))
    try:
        yield running
    finally:
        procs.stop_all(started)


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
