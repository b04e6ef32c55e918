"""Every RPC of the marketplace, called by every caller against objects of both tenants, ends exactly as
the matrix says (tests.support.authorization_matrix). Run with `-s` for a table of
rpc x target x caller -> outcome."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import MethodDescriptor

from eddie.marketplace.v1 import identity_pb2
from tests.support.authorization import (
    ANON,
    CALLERS,
    CUSTOMER_A,
    CUSTOMER_B,
    Ctx,
    Expect,
    Ok,
    Row,
    invoke,
    judge,
    signature,
)
from tests.support.authorization_matrix import MATRIX
from tests.support.calls import RPCS

pytestmark = pytest.mark.asyncio(loop_scope="package")


def _key(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


# (rpc, target, caller) -> outcome label, printed with `pytest -s`
SUMMARY: list[tuple[str, str, str, str]] = []


async def test_matrix_names_only_rpcs_that_exist() -> None:
    assert set(MATRIX) <= {_key(m) for m, _ in RPCS}, "rows for RPCs the services no longer have"
    for rpc, rows in MATRIX.items():
        assert rows, rpc
        for row in rows:
            assert set(row.expect) == set(CALLERS), (
                f"{rpc} [{row.target}]: not every caller has an expectation"
            )


@pytest.mark.parametrize(("method", "attr"), RPCS, ids=[_key(m) for m, _ in RPCS])
async def test_authorization(ctx: Ctx, method: MethodDescriptor, attr: str) -> None:
    rpc = _key(method)
    rows = MATRIX.get(rpc)
    assert rows, f"{rpc} has no rows in MATRIX: say who may call it, on whose objects"
    problems: list[str] = []
    for row in rows:
        problems += await _run_row(ctx, rpc, method, attr, row)
    print()
    for r, target, caller, label in SUMMARY:
        if r == rpc:
            print(f"authz {rpc:40} {target:48} {caller:11} {label}")
    assert not problems, f"{rpc}:\n" + "\n".join(problems)


async def _run_row(ctx: Ctx, rpc: str, method: MethodDescriptor, attr: str, row: Row) -> list[str]:
    if not row.stand_ins:
        return await _run_row_as_callers(ctx, rpc, method, attr, row)
    roles = {CUSTOMER_A: identity_pb2.ROLE_CUSTOMER, CUSTOMER_B: identity_pb2.ROLE_CUSTOMER}
    ctx.stand_ins = {
        caller: await ctx.world.market.signup(roles.get(caller, identity_pb2.ROLE_ELIGIBLE_PARTY))
        for caller in CALLERS
        if caller != ANON
    }
    try:
        return await _run_row_as_callers(ctx, rpc, method, attr, row)
    finally:
        ctx.stand_ins = {}


async def _run_row_as_callers(ctx: Ctx, rpc: str, method: MethodDescriptor, attr: str, row: Row) -> list[str]:
    problems: list[str] = []
    refused = [c for c in CALLERS if not _allows(row.expect[c])]
    allowed = [c for c in CALLERS if _allows(row.expect[c])]
    before = await row.snapshot(ctx) if row.snapshot else None
    for caller in refused + allowed:  # refusals first: a target consumed by its owner is seen unchanged
        if row.snapshot and allowed and caller == allowed[0]:
            problems += _unchanged(row, before, await row.snapshot(ctx))
        outcome = await invoke(ctx, method, attr, caller, row.build(ctx, caller))
        SUMMARY.append((rpc, row.target, caller, outcome.label))
        problem = judge(ctx, caller, row.expect[caller], outcome)
        if problem:
            problems.append(f"  [{row.target}] as {caller}: {problem}")
        if row.ghost is not None and caller in refused:
            ghost = await invoke(ctx, method, attr, caller, row.ghost(ctx, caller))
            if signature(ghost) != signature(outcome):
                problems.append(
                    f"  [{row.target}] as {caller}: tells the object exists: "
                    f"{signature(outcome)} vs a missing one {signature(ghost)}"
                )
    if row.snapshot and not allowed:
        problems += _unchanged(row, before, await row.snapshot(ctx))
    return problems


def _allows(expect: Expect) -> bool:
    return isinstance(expect, Ok) and not expect.inband_refusal


def _unchanged(row: Row, before: object, after: object) -> list[str]:
    if before == after:
        return []
    return [f"  [{row.target}] refused calls changed the target:\n    before {before}\n    after  {after}"]
