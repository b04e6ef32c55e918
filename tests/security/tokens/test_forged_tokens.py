"""1-3, 9: forged headers, time claims and required claims are refused by every program."""

from __future__ import annotations

import pytest

from eddie_common import tokens
from tests.support.token_forgery import FORGERIES, Forgery
from tests.support.token_programs import TARGETS, Programs, call, expect_refused

pytestmark = pytest.mark.asyncio(loop_scope="package")

# --- 1-3, 9: headers, time claims and required claims on every program ---------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("forgery", FORGERIES)
async def test_forged_tokens_are_refused_by_every_program(
    programs: Programs, target: str, forgery: Forgery
) -> None:
    token = forgery.token(programs, target)
    if forgery.reason is None:
        await call(programs, target, f"Bearer {token}")
        return
    err = await expect_refused(programs, target, token, forgery.reason)
    if forgery.message is not None:
        assert err.details() == forgery.message


async def test_the_leeway_is_small_and_documented() -> None:
    assert 0 < tokens.LEEWAY_SECONDS <= 60
    assert "leeway" in (tokens.__doc__ or "")
