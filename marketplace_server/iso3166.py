"""ISO 3166 region codes: the officially assigned ISO 3166-1 alpha-2 codes and code parsing.

A region is a country (`AT`, ISO 3166-1 alpha-2) or a subdivision (`AT-9`,
ISO 3166-2: the country, a hyphen and 1 to 3 letters or digits). The country
part is checked against the list below; subdivision parts only by their shape,
so new subdivisions need no update here.
"""

from __future__ import annotations

import re

__all__ = ["COUNTRY_CODES", "country_of", "normalize_region"]

# The 249 officially assigned ISO 3166-1 alpha-2 codes.
COUNTRY_CODES = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ
    BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ
    CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ
    DE DJ DK DM DO DZ
    EC EE EG EH ER ES ET
    FI FJ FK FM FO FR
    GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY
    HK HM HN HR HT HU
    ID IE IL IM IN IO IQ IR IS IT
    JE JM JO JP
    KE KG KH KI KM KN KP KR KW KY KZ
    LA LB LC LI LK LR LS LT LU LV LY
    MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ
    NA NC NE NF NG NI NL NO NP NR NU NZ
    OM
    PA PE PF PG PH PK PL PM PN PR PS PT PW PY
    QA
    RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ
    TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ
    UA UG UM US UY UZ
    VA VC VE VG VI VN VU
    WF WS
    YE YT
    ZA ZM ZW
    """.split()  # noqa: SIM905 - a table reads better than 249 quoted strings
)

_REGION = re.compile(r"([A-Z]{2})(?:-[A-Z0-9]{1,3})?", re.ASCII)


def normalize_region(code: str) -> str | None:
    """The upper-case region code, or None when `code` is not an ISO 3166-1/-2 code."""
    if not code.isascii():  # some non-ASCII letters upper-case to ASCII ones
        return None
    upper = code.upper()
    match = _REGION.fullmatch(upper)
    if match is None or match.group(1) not in COUNTRY_CODES:
        return None
    return upper


def country_of(region: str) -> str:
    """The ISO 3166-1 part of a normalized region code (`AT-9` -> `AT`)."""
    return region.partition("-")[0]
