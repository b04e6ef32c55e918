"""PageTokenCodec and page_size: opaque, tamper-proof, filter-bound page tokens."""

from __future__ import annotations

import base64
import json

import pytest

from eddie_common.errors import InvalidArgument
from eddie_common.page_tokens import MAX_PAGE_TOKEN_LENGTH, PageTokenCodec, page_size
from eddie_common.tokens import SigningKey

FILTERS = {"region": "AT", "kind": 1, "show_closed": False}


@pytest.fixture(scope="module")
def codec() -> PageTokenCodec:
    return PageTokenCodec.from_signing_key(SigningKey.generate())


def assert_invalid_token(
    codec: PageTokenCodec, token: str, method: str = "List", filters: dict = FILTERS
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        codec.decode(token, method, filters)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in caught.value.violations] == ["page_token"]


def test_a_token_round_trips_its_cursor(codec: PageTokenCodec) -> None:
    token = codec.encode("List", FILTERS, {"seq": 42, "after": "x"})
    assert codec.decode(token, "List", dict(reversed(FILTERS.items()))) == {"seq": 42, "after": "x"}
    assert codec.decode_int(token, "List", FILTERS, "seq") == 42
    assert token.isascii()
    assert "=" not in token
    assert len(token) < 200


def test_an_empty_token_is_the_first_page(codec: PageTokenCodec) -> None:
    assert codec.decode("", "List", FILTERS) is None
    assert codec.decode_int("", "List", FILTERS, "seq") is None


def test_a_page_is_cut_at_its_size_and_continues_after_its_last_row(codec: PageTokenCodec) -> None:
    rows, token = codec.page([5, 4, 3], 2, "List", FILTERS, lambda seq: {"seq": seq})
    assert rows == [5, 4]
    assert codec.decode_int(token, "List", FILTERS, "seq") == 4
    assert codec.page([5, 4], 2, "List", FILTERS, lambda seq: {"seq": seq}) == ([5, 4], "")
    assert codec.page([], 2, "List", FILTERS, lambda seq: {"seq": seq}) == ([], "")


def test_tokens_survive_a_restart_with_the_same_key() -> None:
    key = SigningKey.generate()
    token = PageTokenCodec.from_signing_key(key).encode("List", FILTERS, {"seq": 1})
    assert PageTokenCodec.from_signing_key(key).decode(token, "List", FILTERS) == {"seq": 1}
    assert_invalid_token(PageTokenCodec.from_signing_key(SigningKey.generate()), token)


def test_a_token_is_bound_to_its_method_and_filters(codec: PageTokenCodec) -> None:
    token = codec.encode("List", FILTERS, {"seq": 1})
    assert_invalid_token(codec, token, method="ListOther")
    assert_invalid_token(codec, token, filters={**FILTERS, "region": "AT-9"})
    assert_invalid_token(codec, token, filters={**FILTERS, "text": ""})


def test_the_cursor_is_not_encrypted_but_cannot_be_changed(codec: PageTokenCodec) -> None:
    token = codec.encode("List", FILTERS, {"seq": 1})
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    payload, mac = raw[:-16], raw[-16:]
    body = json.loads(payload)
    body["c"]["seq"] = 10**9
    forged_payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    forged = base64.urlsafe_b64encode(forged_payload + mac).decode().rstrip("=")
    assert_invalid_token(codec, forged)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],
        lambda t: t[1:],
        lambda t: t + "A",
        lambda t: t[:10] + ("B" if t[10] == "A" else "A") + t[11:],
        lambda t: t + "!",
        lambda t: t.replace("-", "+").replace("_", "/") + "+/",
    ],
)
def test_mangled_tokens_are_invalid(codec: PageTokenCodec, mangle) -> None:
    token = codec.encode("List", FILTERS, {"seq": 7})
    mangled = mangle(token)
    assert mangled != token
    assert_invalid_token(codec, mangled)


@pytest.mark.parametrize("token", ["%%%", "AAAA", "A" * (MAX_PAGE_TOKEN_LENGTH + 1), "ünicode", "e30"])
def test_garbage_tokens_are_invalid(codec: PageTokenCodec, token: str) -> None:
    assert_invalid_token(codec, token)


def test_a_signed_non_integer_cursor_is_invalid_for_decode_int(codec: PageTokenCodec) -> None:
    for value in ("7", 7.5, True, None):
        token = codec.encode("List", FILTERS, {"seq": value})
        with pytest.raises(InvalidArgument):
            codec.decode_int(token, "List", FILTERS, "seq")


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        PageTokenCodec(b"short")


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 50), (1, 1), (50, 50), (500, 500), (501, 500), (2**31 - 1, 500)]
)
def test_page_size_defaults_and_caps(value: int, expected: int) -> None:
    assert page_size(value) == expected


def test_page_size_with_other_limits_and_negative() -> None:
    assert page_size(0, default=10, maximum=20) == 10
    assert page_size(30, default=10, maximum=20) == 20
    with pytest.raises(InvalidArgument) as caught:
        page_size(-1)
    assert [v.field for v in caught.value.violations] == ["page_size"]
