"""Hostile AIIDAs on the Connect stream (slow, flooding, wrong query ids, malformed bytes, killed or
frozen mid-search): the misbehaving instance is counted as what it is, loses at most its own stream,
and every well-behaved instance's answer is still exactly right."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
import zlib
from pathlib import Path

import grpc
import pytest

from eddie.marketplace.v1 import (
    access_pb2,
    consent_pb2,
    data_request_pb2,
    identity_pb2,
    instance_pb2,
    instance_pb2_grpc,
)
from eddie_client import procs
from marketplace_server.aiida.link import MAX_UNSOLICITED_PER_MINUTE
from marketplace_server.services.statuses import WORKERS as STATUS_WORKERS
from tests.support.arena import (
    EXPECTED,
    PROFILES,
    SECRET,
    SINK_URI,
    STATUS_FLOOD,
    Arena,
    DataAccess,
    Permission,
    assert_exact,
)
from tests.support.hostile_aiida import (
    Flood,
    Garbage,
    HostileAiida,
    Script,
    Silent,
    Slow,
    StatusFlood,
    WrongIds,
    reply,
    status,
)

# --- 1. hostile AIIDAs on the Connect stream ---


async def test_a_slow_aiida_is_timed_out_and_its_late_reply_counts_for_nothing(arena: Arena) -> None:
    # Query 1 is answered "matched" after the search ended, and lands while search 2 runs; query 2
    # is answered "not matched", after the late reply; query 3 is answered "matched" at once.
    slow = Slow(delays=[1.0, 1.0, 0.0], answers=[True, False, True])
    aiida = await HostileAiida({"slow-box": slow}).start()
    try:
        await arena.add(aiida, "slow-box")
        matches, first, elapsed = await arena.search(timeout=0.5)
        assert_exact(matches, first, hostile=1, timed_out=1)
        assert elapsed < 0.5 + 0.4, "the search outlived its timeout"

        second_started = time.monotonic()
        matches, second, _ = await arena.search(timeout=3.0)
        second_ended = time.monotonic()
        assert_exact(matches, second, hostile=1, not_matched=3)
        # The test did what it says: the late "matched" arrived during search 2, before its real answer.
        late_query, late_at = slow.replied[0]
        assert late_query == slow.query_ids[0]
        assert second_started < late_at < slow.replied[1][1] < second_ended

        matches, third, _ = await arena.search(timeout=3.0)
        assert_exact(matches, third, hostile=1, matched=EXPECTED | {"slow-box"})

        stored = await arena.ep.data_requests.GetSearch(
            data_request_pb2.GetSearchRequest(name=first.search), metadata=arena.ep.metadata
        )
        assert set(stored.matched_instance_ids) == EXPECTED
        assert (stored.summary.matched, stored.summary.timed_out) == (2, 1)
        # A late reply is not a reason to drop the stream.
        assert (aiida.opened["slow-box"], aiida.closed["slow-box"]) == (1, 0)
        arena.assert_honest_untouched()
    finally:
        await aiida.stop()


async def test_a_flooding_aiida_loses_its_own_stream_and_nobody_else_does(arena: Arena) -> None:
    # The flooder shares the honest instances' port, so their streams share its HTTP/2 connection.
    flood = Flood()
    arena.honest.scripts["flood-box"] = flood
    await arena.add(arena.honest, "flood-box", wait=False)
    await arena.honest.until(lambda: arena.honest.closed["flood-box"] >= 1, 10, "the flooder's stream cut")
    first = arena.honest.history["flood-box"][0]
    assert first.sent > MAX_UNSOLICITED_PER_MINUTE, "cut before it flooded: the test proves nothing"
    # The flooder comes back (the link reconnects) and floods again while the searches run.
    for _ in range(3):
        matches, summary, elapsed = await arena.search(timeout=1.0)
        assert_exact(
            matches,
            summary,
            hostile=1,
            unreachable=summary.unreachable,
            timed_out=summary.timed_out,
        )
        assert summary.unreachable + summary.timed_out == 1, "the flooder is neither unreachable nor late"
        assert elapsed < 1.0 + 0.5
    # The link is kept (it reconnects: the instance may recover), but within the minute a stream
    # of the flooder is cut again at its first stray message, so a new flood costs next to nothing.
    await arena.honest.until(lambda: arena.honest.opened["flood-box"] >= 3, 5, "the flooder reconnected")
    # Its reconnect backoff keeps growing: a stream cut for flooding is no good connection.
    if arena.app is not None:
        assert arena.app.manager.links["flood-box"].failed_attempts >= 2
    later = [s for s in arena.honest.history["flood-box"][1:] if s.ended.is_set()]
    assert later and all(s.sent < 200 for s in later), [s.sent for s in later]
    arena.assert_honest_untouched()
    account = await arena.owner.identity.GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=arena.owner.metadata
    )
    assert account.name == arena.owner.account.name  # type: ignore[union-attr]


async def test_a_status_flood_does_not_hold_up_another_instances_report(arena: Arena) -> None:
    # An accepted permission on an honest instance, configured there and waiting for its "active".
    matches, _, _ = await arena.search(timeout=3.0)
    assert "honest-match-1" in matches
    [permission] = (
        await arena.ep.access.RequestAccess(
            access_pb2.RequestAccessRequest(
                data_request=arena.data_request.name, instance_ids=["honest-match-1"], sink_uri=SINK_URI
            ),
            metadata=arena.ep.metadata,
        )
    ).permissions
    permission_id = permission.name.removeprefix("permissions/")
    await arena.owner.consent.DecideAccess(
        consent_pb2.DecideAccessRequest(permission=permission.name, approve=True),
        metadata=arena.owner.metadata,
    )
    await arena.honest.until(lambda: permission_id in arena.honest.configured, 5, "configured")
    # Another instance reports thousands of permissions it was never given, all in the same status
    # partition as the honest one (the worst case for a hash-partitioned queue).
    partition = zlib.crc32(permission_id.encode()) % STATUS_WORKERS
    ghosts = (f"ghost{i}" for i in itertools.count())
    same_partition = (g for g in ghosts if zlib.crc32(g.encode()) % STATUS_WORKERS == partition)
    flood = list(itertools.islice(same_partition, STATUS_FLOOD))
    arena.honest.scripts["status-box"] = StatusFlood(flood)
    await arena.add(arena.honest, "status-box")
    await arena.honest.until(
        lambda: arena.honest.history["status-box"][-1].sent >= STATUS_FLOOD, 20, "the flood sent"
    )
    reported = time.monotonic()
    await arena.honest.streams["honest-match-1"].send(status(permission_id, DataAccess.STATE_ACTIVE))
    while (
        await arena.ep.access.GetPermission(
            access_pb2.GetPermissionRequest(name=permission.name), metadata=arena.ep.metadata
        )
    ).state != Permission.STATE_ACTIVE:
        assert time.monotonic() - reported < 2.0, "the honest report waited behind the flood"
        await asyncio.sleep(0.02)
    matches, summary, elapsed = await arena.search(timeout=2.0)
    assert_exact(matches, summary, hostile=1, matched=EXPECTED | {"status-box"})
    assert elapsed < 1.0
    for ghost in flood[:50]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await arena.ep.access.GetPermission(
                access_pb2.GetPermissionRequest(name=f"permissions/{ghost}"), metadata=arena.ep.metadata
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    arena.assert_honest_untouched()


async def test_replies_under_unknown_query_ids_are_ignored(arena: Arena) -> None:
    liar = WrongIds()
    arena.honest.scripts["liar-box"] = liar
    await arena.add(arena.honest, "liar-box")
    for _ in range(2):
        matches, summary, _ = await arena.search(timeout=0.6)
        assert_exact(matches, summary, hostile=1, timed_out=1)
    # It did send "matched" under a finished search's id, a near-miss id, an empty and a huge one.
    assert liar.query_ids[0] in liar.sent_ids and "" in liar.sent_ids and "x" * 4096 in liar.sent_ids
    # A handful of stray replies is below the flood limit: the stream stays.
    assert (arena.honest.opened["liar-box"], arena.honest.closed["liar-box"]) == (1, 0)
    arena.assert_honest_untouched()


async def test_malformed_bytes_close_only_that_stream(arena: Arena) -> None:
    # On the honest port: bytes that are no ConnectResponse as the answer to a query, as the very
    # first message of the stream, and a well-formed answer larger than the marketplace accepts.
    huge = reply("q" * (5 * 1024 * 1024), True)
    scripts = {
        "garbage-box": Garbage(),
        "garbage-first-box": Garbage(on_open=True),
        "huge-box": Garbage(payload=huge),
    }
    arena.honest.scripts.update(scripts)
    for instance_id in scripts:
        await arena.add(arena.honest, instance_id, wait=instance_id != "garbage-first-box")
    await arena.honest.until(lambda: arena.honest.closed["garbage-first-box"] >= 1, 10, "garbage-first cut")
    for _ in range(2):
        matches, summary, elapsed = await arena.search(timeout=3.0)
        # All three are lost at once; the search does not wait for the timeout.
        assert_exact(matches, summary, hostile=3, unreachable=3)
        assert elapsed < 1.5, f"the search waited {elapsed:.2f}s for streams that had broken"
        for instance_id in ("garbage-box", "huge-box"):
            await arena.until_linked(instance_id)  # the link comes back for the next round
    for instance_id in scripts:
        assert arena.honest.closed[instance_id] >= 1, f"{instance_id}'s stream was kept"
    arena.assert_honest_untouched()
    account = await arena.owner.identity.GetCurrentAccount(
        identity_pb2.GetCurrentAccountRequest(), metadata=arena.owner.metadata
    )
    assert account.name == arena.owner.account.name  # type: ignore[union-attr]


async def test_an_instance_that_moves_while_its_stream_is_up_is_followed(arena: Arena) -> None:
    # Re-registering at a new address while the old stream still looks healthy (a NAT rebinding,
    # a half-open connection): the marketplace drops the old stream itself and dials the new one.
    old_home, new_home = Script(True), Script(True)
    old = await HostileAiida({"mover-box": old_home}).start()
    new = await HostileAiida({"mover-box": new_home}).start()
    try:
        await arena.add(old, "mover-box")
        await instance_pb2_grpc.InstanceServiceStub(arena.channel).RegisterInstance(
            instance_pb2.RegisterInstanceRequest(
                instance_id="mover-box",
                address=new.address,
                instance_secret=SECRET,
                pairing_code="CODE-mover",
            )
        )
        await new.until(lambda: new.connected("mover-box") and arena.linked("mover-box"), 5, "followed")
        assert old.closed["mover-box"] == 1 and not old.connected("mover-box")
        matches, summary, _ = await arena.search(timeout=3.0)
        assert_exact(matches, summary, hostile=1, matched=EXPECTED | {"mover-box"})
        assert (len(old_home.query_ids), len(new_home.query_ids)) == (0, 1)
        arena.assert_honest_untouched()
    finally:
        await old.stop()
        await new.stop()


async def test_an_aiida_killed_mid_search_is_unreachable_and_does_not_hold_the_search(arena: Arena) -> None:
    doomed = Silent()
    aiida = await HostileAiida({"doomed-box": doomed}).start()
    await arena.add(aiida, "doomed-box")
    search = asyncio.create_task(arena.search(timeout=5.0))
    try:
        await aiida.until(lambda: bool(doomed.query_ids), 5, "the query reached the doomed box")
        await asyncio.sleep(0.1)  # every honest instance has answered by now
        await aiida.stop(0)
        matches, summary, elapsed = await asyncio.wait_for(search, 10)
    finally:
        await aiida.stop()
    assert_exact(matches, summary, hostile=1, unreachable=1)
    assert elapsed < 2.0, f"the search waited {elapsed:.2f}s of its 5 s for a dead instance"
    matches, summary, elapsed = await arena.search(timeout=5.0)
    assert_exact(matches, summary, hostile=1, unreachable=1)
    assert elapsed < 1.0
    arena.assert_honest_untouched()


async def test_a_frozen_then_killed_aiida_process(arena: Arena, tmp_path: Path) -> None:
    """A real aiida-stub process: SIGSTOP (no FIN, no RST: a hung host) and later SIGKILL mid-search."""
    stub = await asyncio.to_thread(
        procs.start,
        "aiida-frozen",
        [
            "aiida_stub",
            "--listen",
            "127.0.0.1:0",
            "--marketplace",
            arena.address,
            "--state-dir",
            str(tmp_path / "frozen"),
            "--profile",
            str(PROFILES / "vienna-p1.toml"),
            "--instance-id",
            "frozen-box",
            "--pairing-code",
            "FROZEN-2026",
        ],
        tmp_path,
    )
    pid = stub.popen.pid
    try:
        await arena.owner.claim("frozen-box", "FROZEN-2026", wait=10.0)
        await arena.until_linked("frozen-box")
        with_stub = EXPECTED | {"frozen-box"}
        matches, summary, _ = await arena.search(timeout=3.0)
        assert_exact(matches, summary, hostile=1, matched=with_stub)

        os.kill(pid, signal.SIGSTOP)
        matches, summary, elapsed = await arena.search(timeout=0.6)
        assert_exact(matches, summary, hostile=1, timed_out=1)
        assert elapsed < 0.6 + 0.4
        os.kill(pid, signal.SIGCONT)  # it wakes up and answers the old query: too late, ignored
        matches, summary, _ = await arena.search(timeout=3.0)
        assert_exact(matches, summary, hostile=1, matched=with_stub)

        os.kill(pid, signal.SIGSTOP)
        search = asyncio.create_task(arena.search(timeout=5.0))
        await asyncio.sleep(0.3)
        stub.popen.kill()  # the kernel resets its connections
        matches, summary, elapsed = await asyncio.wait_for(search, 10)
        assert_exact(matches, summary, hostile=1, unreachable=1)
        assert elapsed < 2.5, f"the search waited {elapsed:.2f}s of its 5 s for a killed process"
        arena.assert_honest_untouched()
    finally:
        if stub.popen.poll() is None:
            os.kill(pid, signal.SIGCONT)
        stub.kill()
