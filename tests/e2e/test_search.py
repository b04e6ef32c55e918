"""Workflow 5 end to end: a real marketplace and real AIIDA stubs with household profiles of the test's own.

The exact set of matching instances is asserted for a range of data needs, and
the summary counts devices that die, never answer, or are offline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from eddie.marketplace.v1 import data_request_pb2
from eddie_client.client import Session
from tests.support.expect import expect_error
from tests.support.fleet import (
    RunningAiida,
    ScriptedAiida,
    claim,
    create_data_request,
    search,
    start_aiida,
    start_scripted,
    wait_connected,
)
from tests.support.marketplace import RunningMarketplace, start_marketplace, test_config

DAY = 86400.0


def _since(days: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _source(energy: str, interval: str, days: float, tags: dict[str, str]) -> str:
    table = ", ".join(f'"{k}" = "{v}"' for k, v in tags.items())
    return (
        f'[[sources]]\nenergy_type = "{energy}"\ninterval = "{interval}"\n'
        f'available_since = "{_since(days)}"\ndata_tags = {{ {table} }}\n'
    )


def households() -> dict[str, str]:
    """Five households the code under test has never seen."""
    return {
        "linz-flat": 'region = "AT-4"\nseed = 11\n'
        + _source("ELECTRICITY", "PT1S", 900, {"1-0:1.8.0": "kWh", "1-0:2.8.0": "kWh", "1-0:1.7.0": "W"}),
        "styria-farm": 'region = "AT-6"\nseed = 12\n'
        + _source("ELECTRICITY", "PT15M", 200, {"1-0:1.8.0": "kWh"})
        + _source("NATURAL_GAS", "PT1H", 200, {"7-0:3.0.0": "m3"}),
        "munich-house": 'region = "DE-BY"\nseed = 13\n'
        + _source("ELECTRICITY", "PT1M", 1200, {"1-0:1.8.0": "kWh", "1-0:2.8.0": "kWh"})
        + _source("HEAT", "PT15M", 1200, {"6-0:1.0.0": "kWh"}),
        "groningen-pilot": 'region = "NL-GR"\nseed = 14\n'
        + _source("HYDROGEN", "PT1H", 100, {"8-0:1.0.0": "kg"})
        + _source("ELECTRICITY", "PT15M", 100, {"1-0:1.8.0": "kWh"}),
        "austria-new": 'region = "AT"\nseed = 15\n'
        + _source("ELECTRICITY", "PT5M", 10, {"1-0:1.8.0": "kWh"}),
    }


ALL = {"linz-flat", "styria-farm", "munich-house", "groningen-pilot", "austria-new"}
CASES = [
    ("every electricity meter", dict(tags=["1-0:1.8.0"], max_granularity=900), ALL),
    ("import and export", dict(tags=["1-0:1.8.0", "1-0:2.8.0"]), {"linz-flat", "munich-house"}),
    (
        "granularity equal to the bound",
        dict(max_granularity=300),
        {"linz-flat", "munich-house", "austria-new"},
    ),
    ("granularity one minute", dict(max_granularity=60, min_granularity=60), {"linz-flat", "munich-house"}),
    ("country AT", dict(regions=["AT"]), {"linz-flat", "styria-farm", "austria-new"}),
    ("subdivision AT-4 only", dict(regions=["AT-4"]), {"linz-flat"}),
    ("two countries", dict(regions=["DE", "NL"]), {"munich-house", "groningen-pilot"}),
    ("a year of history", dict(history=365 * DAY), {"linz-flat", "munich-house"}),
    (
        "history just long enough",
        dict(history=99 * DAY),
        {"linz-flat", "styria-farm", "munich-house", "groningen-pilot"},
    ),
    ("history one day too long", dict(history=101 * DAY), {"linz-flat", "styria-farm", "munich-house"}),
    (
        "gas hourly",
        dict(energy_type="NATURAL_GAS", tags=["7-0:3.0.0"], max_granularity=3600),
        {"styria-farm"},
    ),
    ("gas too fine", dict(energy_type="NATURAL_GAS", tags=["7-0:3.0.0"], max_granularity=900), set()),
    ("hydrogen", dict(energy_type="HYDROGEN", tags=["8-0:1.0.0"], max_granularity=3600), {"groningen-pilot"}),
    ("heat with a missing tag", dict(energy_type="HEAT", tags=["6-0:1.0.0", "6-0:2.0.0"]), set()),
    ("power nobody has at 15 min in DE", dict(tags=["1-0:1.7.0"], regions=["DE"]), set()),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def _fleet(marketplace: RunningMarketplace, tmp_path: Path) -> tuple[Session, list[RunningAiida]]:
    owner = await marketplace.customer()
    aiidas = []
    for name, text in households().items():
        profile = tmp_path / f"{name}.toml"
        profile.write_text(text)
        aiida = await start_aiida(marketplace, tmp_path, name, profile)
        await claim(owner, aiida)
        aiidas.append(aiida)
    for aiida in aiidas:
        await wait_connected(owner, aiida.instance_id)
    return owner, aiidas


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[RunningMarketplace, Session, list[RunningAiida]]]:
    marketplace = await start_marketplace(test_config(tmp_path, search_rate_per_minute=1000))
    owner, aiidas = await _fleet(marketplace, tmp_path)
    yield marketplace, owner, aiidas
    for aiida in aiidas:
        await aiida.app.stop(0)
    await marketplace.channel.close()
    await marketplace.app.stop(0)


async def test_search_returns_exactly_the_matching_households(world) -> None:  # type: ignore[no-untyped-def]
    marketplace, _, _ = world
    ep = await marketplace.eligible_party()
    for label, need, expected in CASES:
        request = await create_data_request(ep, **need)
        matches, summary = await search(ep, request.name)
        assert set(matches) == expected, label
        assert len(matches) == len(expected), f"{label}: duplicate matches"
        assert summary.queried == 5, label
        assert (summary.matched, summary.not_matched) == (len(expected), 5 - len(expected)), label
        assert (summary.unreachable, summary.timed_out) == (0, 0), label
        stored = await ep.data_requests.GetSearch(
            data_request_pb2.GetSearchRequest(name=summary.search), metadata=ep.metadata
        )
        assert set(stored.matched_instance_ids) == expected, label


async def test_only_the_owner_may_search_an_open_request(world) -> None:  # type: ignore[no-untyped-def]
    marketplace, owner, _ = world
    ep, other = await marketplace.eligible_party(), await marketplace.eligible_party()
    request = await create_data_request(ep)
    await expect_error(search(other, request.name), grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER")
    await expect_error(search(owner, request.name), grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    await expect_error(search(ep, "dataRequests/nope"), grpc.StatusCode.NOT_FOUND)
    await expect_error(search(ep, "bogus"), grpc.StatusCode.INVALID_ARGUMENT, field="data_request")
    await expect_error(
        search(ep, request.name, timeout=3600), grpc.StatusCode.INVALID_ARGUMENT, field="timeout"
    )
    await ep.data_requests.CloseDataRequest(
        data_request_pb2.CloseDataRequestRequest(name=request.name), metadata=ep.metadata
    )
    await expect_error(search(ep, request.name), grpc.StatusCode.FAILED_PRECONDITION, "DATA_REQUEST_CLOSED")
    _, summary = await search(ep, (await create_data_request(ep)).name)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ep.data_requests.GetSearch(
            data_request_pb2.GetSearchRequest(name=summary.search), metadata=other.metadata
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_dead_silent_and_offline_devices_are_counted(world) -> None:  # type: ignore[no-untyped-def]
    marketplace, owner, aiidas = world
    ep = await marketplace.eligible_party()
    silent = await start_scripted(marketplace, owner, "silent-box", ScriptedAiida(delay=None))
    dying = await start_scripted(marketplace, owner, "dying-box", ScriptedAiida(delay=2.0))
    offline = aiidas[-1]
    await offline.app.stop(0)
    await wait_connected(owner, offline.instance_id, connected=False)
    request = await create_data_request(ep)

    async def kill_soon() -> None:
        await asyncio.sleep(0.5)
        await dying.stop(0)

    killer = asyncio.create_task(kill_soon())
    started = time.monotonic()
    matches, summary = await search(ep, request.name, timeout=1.5)
    elapsed = time.monotonic() - started
    await killer
    assert set(matches) == ALL - {offline.instance_id}
    assert summary.queried == 7
    assert summary.matched == 4
    assert summary.not_matched == 0
    assert summary.unreachable == 2  # offline + killed mid-search
    assert summary.timed_out == 1  # the silent one
    assert elapsed < 1.5 + 1.0, "the summary waited beyond the timeout"
    await silent.stop(0)


async def test_search_returns_when_every_instance_is_gone(world) -> None:  # type: ignore[no-untyped-def]
    marketplace, owner, aiidas = world
    ep = await marketplace.eligible_party()
    for aiida in aiidas:
        await aiida.app.stop(0)
    for aiida in aiidas:
        await wait_connected(owner, aiida.instance_id, connected=False)
    matches, summary = await search(ep, (await create_data_request(ep)).name, timeout=5)
    assert matches == []
    assert (summary.queried, summary.unreachable, summary.matched, summary.timed_out) == (5, 5, 0, 0)
    assert summary.elapsed.ToTimedelta().total_seconds() < 1.0


async def test_the_callers_deadline_stops_the_fan_out(world) -> None:  # type: ignore[no-untyped-def]
    marketplace, owner, _ = world
    ep = await marketplace.eligible_party()
    silent = await start_scripted(marketplace, owner, "silent-box-2", ScriptedAiida(delay=None))
    request = await create_data_request(ep)
    started = time.monotonic()
    responses = []
    code = grpc.StatusCode.OK
    try:
        async for r in ep.data_requests.SearchInstances(
            data_request_pb2.SearchInstancesRequest(data_request=request.name),
            metadata=ep.metadata,
            timeout=1.0,
        ):
            responses.append(r)
    except grpc.aio.AioRpcError as err:
        code = err.code()
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 2.5
    # The server summarises before the deadline when it can: the default 3 s timeout is cut to the deadline.
    summaries = [r.summary for r in responses if r.HasField("summary")]
    if summaries:
        assert summaries[0].timed_out == 1
    await silent.stop(0)
