"""Connect: exactly one reply per query, pongs, and status events on the newest stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from eddie.aiida.v1 import aiida_pb2
from eddie.energy.v1 import energy_pb2
from eddie_common.interceptors import error_info
from tests.support.stub import RunningSink, RunningStub
from tests.support.stub_messages import configure, data_access, data_need, read_until, status_of

State = aiida_pb2.DataAccess.State
MATCHING = data_need(regions=("AT",))  # the default profile: vienna-p1, AT-9, electricity at 1 s
NOT_MATCHING = data_need(regions=("DE",))


def query(query_id: str, need: energy_pb2.DataNeed) -> aiida_pb2.ConnectRequest:
    return aiida_pb2.ConnectRequest(search_query=aiida_pb2.SearchQuery(query_id=query_id, data_need=need))


async def test_many_queries_in_flight_each_get_exactly_one_reply(stub: RunningStub) -> None:
    call = stub.aiida.Connect(metadata=stub.metadata())
    expected = {f"q{i}": i % 3 != 0 for i in range(300)}

    async def writer() -> None:
        for query_id, verdict in expected.items():
            await call.write(query(query_id, MATCHING if verdict else NOT_MATCHING))
        await call.done_writing()

    async def reader() -> dict[str, list[bool]]:
        replies: dict[str, list[bool]] = {}
        async for message in call:
            assert message.WhichOneof("message") == "match_reply"
            replies.setdefault(message.match_reply.query_id, []).append(message.match_reply.matched)
        return replies

    _, replies = await asyncio.wait_for(asyncio.gather(writer(), reader()), 20)
    assert replies == {query_id: [verdict] for query_id, verdict in expected.items()}
    assert await call.code() == grpc.StatusCode.OK


async def test_several_streams_answer_concurrently(stub: RunningStub) -> None:
    calls = [stub.aiida.Connect(metadata=stub.metadata()) for _ in range(20)]
    for i, call in enumerate(calls):
        await call.write(query(f"s{i}", MATCHING))
    for i, call in enumerate(calls):
        reply = await asyncio.wait_for(call.read(), 5)
        assert reply.match_reply.query_id == f"s{i}"
        assert reply.match_reply.matched
        call.cancel()


async def test_ping_is_answered_with_a_pong_of_the_same_sequence(stub: RunningStub) -> None:
    call = stub.aiida.Connect(metadata=stub.metadata())
    for sequence in (1, 2, 2**63):
        await call.write(aiida_pb2.ConnectRequest(ping=aiida_pb2.Ping(sequence=sequence)))
        reply = await asyncio.wait_for(call.read(), 5)
        assert reply.WhichOneof("message") == "pong"
        assert reply.pong.sequence == sequence
    call.cancel()


async def test_statuses_are_reported_when_a_stream_opens(stub: RunningStub, sink: RunningSink) -> None:
    sink.service.tokens["p-active"] = "sink-token"
    await stub.aiida.ConfigureDataAccess(
        configure(data_access("p-active", sink.uri)), metadata=stub.metadata()
    )
    gas = data_need(tags=("7-0:3.0.0",), energy_type=energy_pb2.ENERGY_TYPE_NATURAL_GAS)
    await stub.aiida.ConfigureDataAccess(
        configure(data_access("p-gas", sink.uri, need=gas)), metadata=stub.metadata()
    )
    await stub.aiida.RevokeDataAccess(
        aiida_pb2.RevokeDataAccessRequest(permission_id="p-gone", reason="bye"), metadata=stub.metadata()
    )

    call = stub.aiida.Connect(metadata=stub.metadata())
    statuses: dict[str, aiida_pb2.DataAccessStatus] = {}
    for _ in range(3):
        message = await asyncio.wait_for(call.read(), 5)
        assert message.WhichOneof("message") == "data_access_status"
        statuses[message.data_access_status.permission_id] = message.data_access_status
    assert statuses["p-active"].state == State.STATE_ACTIVE
    assert statuses["p-gas"].state == State.STATE_UNFULFILLABLE
    assert statuses["p-gas"].reason
    assert (statuses["p-gone"].state, statuses["p-gone"].reason) == (State.STATE_REVOKED, "bye")
    call.cancel()


async def test_status_events_go_to_the_newest_stream(stub: RunningStub, sink: RunningSink) -> None:
    older = stub.aiida.Connect(metadata=stub.metadata())
    await older.write(aiida_pb2.ConnectRequest(ping=aiida_pb2.Ping(sequence=1)))
    assert (await older.read()).pong.sequence == 1  # the older stream is open
    newer = stub.aiida.Connect(metadata=stub.metadata())
    await newer.write(aiida_pb2.ConnectRequest(ping=aiida_pb2.Ping(sequence=2)))
    assert (await newer.read()).pong.sequence == 2

    sink.service.tokens["p-new"] = "sink-token"
    await stub.aiida.ConfigureDataAccess(configure(data_access("p-new", sink.uri)), metadata=stub.metadata())
    await read_until(newer, status_of("p-new", State.STATE_ACTIVE))
    await stub.aiida.RevokeDataAccess(
        aiida_pb2.RevokeDataAccessRequest(permission_id="p-new", reason="stop"), metadata=stub.metadata()
    )
    await read_until(newer, status_of("p-new", State.STATE_REVOKED))

    await older.write(aiida_pb2.ConnectRequest(ping=aiida_pb2.Ping(sequence=3)))
    reply = await asyncio.wait_for(older.read(), 5)
    assert reply.WhichOneof("message") == "pong"  # no status reached the older stream
    older.cancel()
    newer.cancel()


async def test_a_query_without_a_data_need_does_not_match(stub: RunningStub) -> None:
    call = stub.aiida.Connect(metadata=stub.metadata())
    await call.write(aiida_pb2.ConnectRequest(search_query=aiida_pb2.SearchQuery(query_id="empty")))
    reply = await asyncio.wait_for(call.read(), 5)
    assert (reply.match_reply.query_id, reply.match_reply.matched) == ("empty", False)
    call.cancel()


async def test_bytes_that_are_not_a_connect_request_end_the_stream_with_invalid_argument(
    stub: RunningStub,
) -> None:
    """A hostile or broken peer: the stream ends with MALFORMED_REQUEST after the good messages
    before it were answered, and the instance keeps serving new streams."""
    raw = stub.channel.stream_stream(
        "/eddie.aiida.v1.AiidaService/Connect",
        request_serializer=lambda b: b,
        response_deserializer=aiida_pb2.ConnectResponse.FromString,
    )
    call = raw(metadata=stub.metadata())
    await call.write(aiida_pb2.ConnectRequest(ping=aiida_pb2.Ping(sequence=7)).SerializeToString())
    assert (await asyncio.wait_for(call.read(), 5)).pong.sequence == 7
    await call.write(b"\xff\xff\xff")  # a truncated varint: not a message
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call.read(), 5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None and info.reason == "MALFORMED_REQUEST"
    again = stub.aiida.Connect(metadata=stub.metadata())
    await again.write(aiida_pb2.ConnectRequest(ping=aiida_pb2.Ping(sequence=8)))
    assert (await asyncio.wait_for(again.read(), 5)).pong.sequence == 8
    again.cancel()
