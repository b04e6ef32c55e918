"""Search matches stream in batches: every id exactly once, the first at once, no timer.

The tally is tested directly (ids that arrive while the consumer is busy go into
one batch), and end to end through real grpc.aio servers: the marketplace on
port 0 and an AIIDA double hosting the instances behind one port.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.protobuf.duration_pb2 import Duration

from eddie.marketplace.v1 import data_request_pb2
from marketplace_server.aiida.fanout import SearchTally
from tests.support.access import Scene, aiida, market, new_scene
from tests.support.aiida_double import RunningAiida
from tests.support.marketplace import RunningMarketplace

__all__ = ["aiida", "market"]  # fixtures


def _tally(*ids: str) -> SearchTally:
    tally = SearchTally("q")
    tally.asked.update(ids)
    tally.queried = len(ids)
    return tally


async def _collect(batches: AsyncIterator[list[str]]) -> list[list[str]]:
    return [batch async for batch in batches]


# --- the tally ---


async def test_ids_that_arrive_while_the_consumer_is_busy_go_out_together() -> None:
    tally = _tally("a", "b", "c", "d", "e")
    loop = asyncio.get_running_loop()
    batches = tally.batches(loop.time() + 10)
    tally.on_reply("a", True)
    assert await anext(batches) == ["a"]  # the first match leaves at once
    # While the consumer "writes" batch one, three answers arrive (one a non-match).
    tally.on_reply("b", True)
    tally.on_reply("c", False)
    tally.on_reply("d", True)
    assert await anext(batches) == ["b", "d"]
    tally.on_reply("e", True)
    assert await anext(batches) == ["e"]
    with pytest.raises(StopAsyncIteration):
        await anext(batches)  # everyone answered: the stream ends without waiting for the deadline
    assert (tally.matched, tally.not_matched, tally.unreachable, tally.pending) == (4, 1, 0, 0)


async def test_a_second_answer_and_an_unasked_one_are_refused() -> None:
    tally = _tally("a", "b")
    assert tally.on_reply("a", True)
    assert not tally.on_reply("a", True)
    assert not tally.on_reply("zz", True)
    tally.on_lost("b")
    batches = await _collect(tally.batches(asyncio.get_running_loop().time() + 10))
    assert batches == [["a"]]
    assert (tally.matched, tally.unreachable) == (1, 1)


async def test_the_deadline_ends_the_stream_and_close_counts_the_silent() -> None:
    tally = _tally("a", "b", "c")
    tally.on_reply("a", True)
    batches = await _collect(tally.batches(asyncio.get_running_loop().time() + 0.05))
    assert batches == [["a"]]
    assert tally.close() == 2  # b and c timed out
    assert not tally.on_reply("b", True)  # a late answer is dropped
    assert tally.matched == 1


async def test_nothing_to_ask_ends_at_once() -> None:
    tally = _tally()
    tally.close()
    assert await _collect(tally.batches(asyncio.get_running_loop().time() + 10)) == []


async def test_progress_only_updates_come_when_the_count_changed_and_no_faster_than_the_interval() -> None:
    tally = _tally("a", "b", "c", "d")
    loop = asyncio.get_running_loop()
    interval = 0.05
    batches = tally.batches(loop.time() + 10, progress_interval=interval)
    tally.on_reply("a", True)
    assert (await anext(batches), tally.answered) == (["a"], 1)  # counts ride on the batch
    # Nothing new: no update however long the stream waits (several intervals here).
    pending = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(interval * 4)
    assert not pending.done()
    # Two non-matches: one progress-only update (no ids), carrying both.
    tally.on_reply("b", False)
    tally.on_reply("c", False)
    assert await pending == []
    assert tally.answered == 3
    tally.on_lost("d")  # unreachable counts as accounted for; the tally closes, the stream ends
    with pytest.raises(StopAsyncIteration):
        await anext(batches)
    assert (tally.answered, tally.queried) == (4, 4)


async def test_without_a_progress_interval_only_matches_are_yielded() -> None:
    tally = _tally("a", "b")
    loop = asyncio.get_running_loop()
    batches = tally.batches(loop.time() + 0.2)
    tally.on_reply("a", False)
    assert await _collect(batches) == []  # the deadline ended it; the non-match made no update
    assert tally.answered == 1


# --- end to end ---


async def _search_messages(
    scene: Scene, timeout: float = 5.0, progress: bool = False
) -> AsyncIterator[data_request_pb2.SearchInstancesResponse]:
    request = data_request_pb2.SearchInstancesRequest(
        data_request=scene.data_request.name, timeout=Duration(seconds=int(timeout)), progress=progress
    )
    async for response in scene.ep.data_requests.SearchInstances(request, metadata=scene.ep.metadata):
        yield response


async def _scene_with(
    market: RunningMarketplace, aiida: RunningAiida, matched: int, unmatched: int
) -> tuple[Scene, set[str], set[str]]:
    scene = await new_scene(market, aiida)
    yes = {await scene.add_instance(matched=True) for _ in range(matched)}
    no = {await scene.add_instance(matched=False) for _ in range(unmatched)}
    return scene, yes, no


async def test_the_union_of_the_batches_is_exactly_the_matched_set(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, yes, _ = await _scene_with(market, aiida, matched=12, unmatched=7)
    for _ in range(3):
        batches, summary = [], None
        async for response in _search_messages(scene):
            if response.HasField("matches"):
                assert summary is None, "a batch after the summary"
                if response.matches.instance_ids:  # else progress only
                    batches.append(list(response.matches.instance_ids))
            else:
                summary = response.summary
        ids = [i for batch in batches for i in batch]
        assert len(ids) == len(set(ids)), "an id streamed twice"
        assert set(ids) == yes
        assert summary is not None
        assert (summary.queried, summary.matched, summary.not_matched) == (19, 12, 7)
        assert (summary.unreachable, summary.timed_out) == (0, 0)
        assert len(batches) <= len(yes)
        stored = await scene.ep.data_requests.GetSearch(
            data_request_pb2.GetSearchRequest(name=summary.search), metadata=scene.ep.metadata
        )
        assert set(stored.matched_instance_ids) == yes
        assert len(stored.matched_instance_ids) == len(yes)


async def test_one_match_is_one_message(market: RunningMarketplace, aiida: RunningAiida) -> None:
    scene, yes, _ = await _scene_with(market, aiida, matched=1, unmatched=4)
    responses = [r async for r in _search_messages(scene)]
    kinds = [r.WhichOneof("result") for r in responses]
    assert kinds == ["matches", "summary"]
    assert list(responses[0].matches.instance_ids) == list(yes)
    assert responses[0].matches.queried == 5
    assert (responses[1].summary.matched, responses[1].summary.not_matched) == (1, 4)


async def test_without_progress_no_message_comes_without_ids(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    """Stragglers answering no match 300 ms apart would be progress messages if asked for; not asked,
    the stream is the match and the summary only."""
    scene, yes, no = await _scene_with(market, aiida, matched=1, unmatched=2)
    gates = {i: asyncio.Event() for i in no}
    scene.double.gates.update(gates)
    stream = _search_messages(scene)
    first = await asyncio.wait_for(anext(stream), 5)
    assert list(first.matches.instance_ids) == list(yes)
    for gate in gates.values():
        await asyncio.sleep(0.3)
        gate.set()
    rest = [r async for r in stream]
    assert [r.WhichOneof("result") for r in rest] == ["summary"]
    assert rest[0].summary.not_matched == 2


async def test_every_message_carries_the_running_answers_and_progress_comes_without_matches(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, yes, no = await _scene_with(market, aiida, matched=1, unmatched=3)
    late_no, last_no = sorted(no)[:2]
    gates = {late_no: asyncio.Event(), last_no: asyncio.Event()}
    scene.double.gates.update(gates)  # these two answer (no match) only when the test lets them
    stream = _search_messages(scene, progress=True)
    seen = [await asyncio.wait_for(anext(stream), 5)]
    first = seen[0].matches
    assert list(first.instance_ids) == list(yes) and first.queried == 4
    assert 1 <= first.answered <= 2  # the match, and maybe the ungated non-match
    # The early non-match is reported as progress (no ids) if the first batch did not carry it.
    while seen[-1].matches.answered < 2:
        seen.append(await asyncio.wait_for(anext(stream), 5))
    gates[late_no].set()
    # No match arrives now: the count still moves, in a progress-only message.
    seen.append(await asyncio.wait_for(anext(stream), 5))
    progress = seen[-1]
    assert progress.HasField("matches") and not progress.matches.instance_ids
    assert (progress.matches.answered, progress.matches.queried) == (3, 4)
    gates[last_no].set()
    seen += [r async for r in stream]
    summary = seen[-1].summary
    messages = [r.matches for r in seen[:-1]]
    assert all(m.queried == summary.queried == 4 for m in messages)
    answered = [m.answered for m in messages]
    assert answered == sorted(answered), "the count went back"
    assert answered[-1] <= summary.queried - summary.timed_out
    assert [i for m in messages for i in m.instance_ids] == list(yes)


async def test_the_first_match_arrives_before_the_last_answer(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    scene, yes, _ = await _scene_with(market, aiida, matched=3, unmatched=1)
    late = await scene.add_instance(matched=True)
    gate = asyncio.Event()
    scene.double.gates[late] = gate  # this instance answers only once the test lets it
    stream = _search_messages(scene)
    first = await asyncio.wait_for(anext(stream), 5)
    assert first.HasField("matches"), "the first message waited for the silent instance"
    assert not gate.is_set()
    early = list(first.matches.instance_ids)
    gate.set()
    rest = [r async for r in stream]
    later = [i for r in rest if r.HasField("matches") for i in r.matches.instance_ids]
    assert sorted(early + later) == sorted(yes | {late})
    assert late in later
    summary = rest[-1].summary
    assert (summary.matched, summary.not_matched, summary.timed_out) == (4, 1, 0)


async def test_concurrent_searches_queue_behind_each_other_on_every_link(
    market: RunningMarketplace, aiida: RunningAiida
) -> None:
    """Several searches at once put several queries on each link's stream: the later ones wait
    behind the write in progress and every search still gets exactly its answers."""
    scene, yes, no = await _scene_with(market, aiida, matched=3, unmatched=2)
    results = await asyncio.gather(*(_collect_search(scene) for _ in range(6)))
    for ids, summary in results:
        assert sorted(ids) == sorted(yes)
        assert (summary.matched, summary.not_matched, summary.unreachable, summary.timed_out) == (3, 2, 0, 0)
    # The double went away mid-life and came back: the links reconnect and write again.
    await aiida.stop()
    await asyncio.gather(*(scene.until_linked(i, linked=False) for i in yes | no))
    await aiida.start()
    await asyncio.gather(*(scene.until_linked(i) for i in yes | no))
    ids, summary = await _collect_search(scene)
    assert sorted(ids) == sorted(yes) and summary.not_matched == 2


async def _collect_search(scene: Scene) -> tuple[list[str], data_request_pb2.SearchSummary]:
    ids: list[str] = []
    summary = data_request_pb2.SearchSummary()
    async for response in _search_messages(scene):
        if response.HasField("matches"):
            ids.extend(response.matches.instance_ids)
        else:
            summary = response.summary
    return ids, summary
