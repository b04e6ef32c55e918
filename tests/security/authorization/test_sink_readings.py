"""The EP sink lists readings to the permission's eligible party only, with real marketplace-issued tokens."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from eddie.framework.v1 import data_sink_pb2
from tests.support.authorization import (
    ANON,
    CALL_TIMEOUT,
    CALLERS,
    CUSTOMER_A,
    CUSTOMER_B,
    EP_A,
    EP_B,
    OK,
    UNAUTH,
    Ctx,
    Outcome,
    Tenant,
    judge,
    nf,
    signature,
)
from tests.support.sink import RunningSink, bearer, reading, sink_config, start_sink

pytestmark = pytest.mark.asyncio(loop_scope="package")

# --- the EP sink: readings are listed to the permission's eligible party only ---


async def _sink_token(ctx: Ctx, t: Tenant, permission_id: str) -> str:
    """The sink token the marketplace issued for the permission (sent to the AIIDA double)."""
    double = ctx.world.aiida.double

    def delivered() -> list[str]:
        return [d.sink_token for d in double.configured(t.instance_id) if d.permission_id == permission_id]

    await double.until(lambda: bool(delivered()))
    return delivered()[0]


async def _list(
    sink: RunningSink, caller_token: str | None, permission_id: str, page_token: str = ""
) -> Outcome:
    request = data_sink_pb2.ListReadingsRequest(
        permission_id=permission_id, page_size=1, page_token=page_token
    )
    try:
        response = await sink.stub.ListReadings(request, metadata=bearer(caller_token), timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        return Outcome([], exc)
    return Outcome([response], None)


async def test_sink_lists_readings_only_to_the_permissions_eligible_party(ctx: Ctx, tmp_path: Path) -> None:
    """With tokens of the real marketplace: the owner pages through, everyone else sees "not found".

    tests/eddie_sink/test_auth.py covers another EP and bad tokens against a marketplace double;
    added here: real marketplace-issued tokens, the permission's own customer, another EP holding
    the owner's page token, and that the refusal is identical to that of an unknown permission.
    """
    a = ctx.a
    permission_id = a.accepted.removeprefix("permissions/")
    token = await _sink_token(ctx, a, permission_id)
    sink = await start_sink(sink_config(tmp_path, ctx.world.market.address))
    try:
        assert await sink.publish(token, [reading(s, permission_id=permission_id) for s in range(3)]) == 3
        tokens = {caller: ctx.client(caller).token or None for caller in CALLERS}
        first = await _list(sink, tokens[EP_A], permission_id)
        assert judge(ctx, EP_A, OK, first) == ""
        page_token = first.responses[0].next_page_token
        assert len(first.responses[0].readings) == 1 and page_token
        assert len(await sink.list_all(tokens[EP_A] or "", permission_id)) == 3

        missing = nf("PERMISSION_NOT_FOUND")
        expect = {ANON: UNAUTH, CUSTOMER_A: missing, CUSTOMER_B: missing, EP_B: missing}
        problems = []
        for caller, expected in expect.items():
            for page in ("", page_token):
                outcome = await _list(sink, tokens[caller], permission_id, page)
                ghost = await _list(sink, tokens[caller], "nosuchpermission0", page)
                target = f"A's readings{' with the owner page token' if page else ''}"
                print(f"authz {'DataSinkService.ListReadings':40} {target:48} {caller:11} {outcome.label}")
                problem = judge(ctx, caller, expected, outcome, domain="framework.eddie")
                if problem:
                    problems.append(f"{caller} page={bool(page)}: {problem}")
                if signature(outcome) != signature(ghost):
                    problems.append(f"{caller}: {signature(outcome)} differs from unknown {signature(ghost)}")
        assert not problems, "\n".join(problems)
    finally:
        await sink.close()
