"""ListReadings pagination: page sizes, opaque and tamper-proof page tokens."""

from __future__ import annotations

import base64

import grpc
import pytest

from eddie_sink.page_tokens import Cursor, PageTokens
from tests.support.expect import expect_error
from tests.support.sink import FakeMarketplace, RunningSink, reading


async def test_pages_follow_each_other_without_gaps_or_repeats(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    tags = ("1-0:1.7.0", "1-0:1.8.0", "1-0:2.8.0")
    await sink.publish(fake_marketplace.sink_token(), [reading(s, t) for s in range(7) for t in tags])
    access = fake_marketplace.access_token()

    pages = []
    page_token = ""
    while True:
        page = await sink.list_page(access, page_size=4, page_token=page_token)
        pages.append([(r.time.seconds - 1_700_000_000, r.data_tag) for r in page.readings])
        page_token = page.next_page_token
        if not page_token:
            break

    assert [len(p) for p in pages] == [4, 4, 4, 4, 4, 1]
    assert [key for page in pages for key in page] == [(s, t) for s in range(7) for t in tags]


async def test_default_page_size_is_100_and_maximum_is_1000(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    await sink.publish(fake_marketplace.sink_token(), [reading(s) for s in range(1005)])
    access = fake_marketplace.access_token()

    default_page = await sink.list_page(access)
    largest_page = await sink.list_page(access, page_size=5000)

    assert len(default_page.readings) == 100
    assert default_page.next_page_token
    assert len(largest_page.readings) == 1000
    last = await sink.list_page(access, page_size=5000, page_token=largest_page.next_page_token)
    assert len(last.readings) == 5
    assert last.next_page_token == ""


async def test_negative_page_size_is_invalid(sink: RunningSink, fake_marketplace: FakeMarketplace):
    await sink.publish(fake_marketplace.sink_token(), [reading(1)])
    await expect_error(
        sink.list_page(fake_marketplace.access_token(), page_size=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="page_size",
    )


async def test_missing_permission_id_is_invalid(sink: RunningSink, fake_marketplace: FakeMarketplace):
    await expect_error(
        sink.list_page(fake_marketplace.access_token(), permission_id=""),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="permission_id",
    )


def _tampered(token: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-3] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


@pytest.mark.parametrize(
    "forge",
    [
        lambda token: "not-a-token",
        lambda token: "!!!",
        _tampered,
        lambda token: PageTokens(b"k" * 32).encode(Cursor("perm-1", 0, "")),
    ],
    ids=["garbage", "not-base64", "tampered", "other-key"],
)
async def test_forged_page_token_is_invalid(sink: RunningSink, fake_marketplace: FakeMarketplace, forge):
    await sink.publish(fake_marketplace.sink_token(), [reading(s) for s in range(3)])
    access = fake_marketplace.access_token()
    page = await sink.list_page(access, page_size=1)

    await expect_error(
        sink.list_page(access, page_size=1, page_token=forge(page.next_page_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        field="page_token",
    )


async def test_page_token_of_another_permission_is_invalid(
    sink: RunningSink, fake_marketplace: FakeMarketplace
):
    for pid in ("perm-1", "perm-2"):
        await sink.publish(
            fake_marketplace.sink_token(pid), [reading(s, permission_id=pid) for s in range(3)]
        )
    access = fake_marketplace.access_token()
    page = await sink.list_page(access, "perm-1", page_size=1)

    await expect_error(
        sink.list_page(access, "perm-2", page_size=1, page_token=page.next_page_token),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


def test_page_token_round_trips_and_binds_its_permission():
    tokens = PageTokens(b"s" * 32)
    cursor = Cursor("perm-1", 1_700_000_000_000_000_000, "1-0:1.8.0")

    assert tokens.decode(tokens.encode(cursor), "perm-1") == cursor
    with pytest.raises(Exception, match="page_token"):
        tokens.decode(tokens.encode(cursor), "perm-2")
