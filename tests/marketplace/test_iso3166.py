"""ISO 3166 region codes: real country codes, subdivision shapes, case-insensitive input."""

from __future__ import annotations

import pytest

from marketplace_server.iso3166 import COUNTRY_CODES, country_of, normalize_region


def test_the_country_list_is_the_249_assigned_codes() -> None:
    assert len(COUNTRY_CODES) == 249
    assert {"AT", "DE", "FR", "GB", "US", "AX", "BQ", "SS", "XK"} - COUNTRY_CODES == {"XK"}
    assert all(len(code) == 2 and code.isupper() and code.isascii() for code in COUNTRY_CODES)


@pytest.mark.parametrize(
    ("code", "normalized"),
    [
        ("AT", "AT"),
        ("at", "AT"),
        ("At-9", "AT-9"),
        ("DE-BY", "DE-BY"),
        ("fr-75c", "FR-75C"),
        ("GB-ENG", "GB-ENG"),
    ],
)
def test_valid_codes_are_upper_cased(code: str, normalized: str) -> None:
    assert normalize_region(code) == normalized


@pytest.mark.parametrize(
    "code",
    [
        "",
        "A",
        "AUT",
        "XX",
        "EU",
        "UK",
        "AT-",
        "AT-1234",
        "AT_9",
        "AT-9 ",
        " AT",
        "AT--9",
        "ÄT",
        "\u0131T",
        "AT-\u0131",
    ],
)
def test_invalid_codes_are_refused(code: str) -> None:
    assert normalize_region(code) is None


def test_country_of_a_region() -> None:
    assert country_of("AT-9") == "AT"
    assert country_of("AT") == "AT"
