"""A search's match set, stored in chunks (`SearchMatchChunkRow`), not as a row per matched instance.

A broad search over 10,000 instances matches 5,000; a row each cost 26-50 ms of the marketplace's CPU
(SQLite, one executemany), the chunks ~3 ms. The ids are sorted bytewise (Python's `sorted`; the
bound columns compare the same way in SQL, see models._ID_BOUND) and stored MATCH_CHUNK per row,
joined by "\\n" (resources.INSTANCE_ID has no newline). Readers find the chunk that
may hold an id by its bounds and test membership here.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import Table, case, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from marketplace_server.db.chunks import chunked
from marketplace_server.db.models import MATCH_CHUNK, SearchMatchChunkRow, SearchRow

__all__ = ["chunk_rows", "matched_by_data_request", "search_match_ids", "searches_matching", "store_matches"]

_CHUNKS = cast(Table, SearchMatchChunkRow.__table__)
_C = SearchMatchChunkRow
SEP = "\n"
# A chunk asked for more ids than this is split into a set; fewer are found by substring search.
_SPLIT_AT = 16


def chunk_rows(search_id: str, instance_ids: Iterable[str], size: int = MATCH_CHUNK) -> list[dict[str, Any]]:
    """The rows of a match set: the distinct ids sorted, `size` per row."""
    ids = sorted(set(instance_ids))
    return [
        {
            "search_id": search_id,
            "seq": n,
            "first_id": part[0],
            "last_id": part[-1],
            "instance_ids": SEP.join(part),
        }
        for n, part in enumerate(chunked(ids, size))
    ]


async def store_matches(session: AsyncSession, search_id: str, instance_ids: Iterable[str]) -> int:
    """Writes the match set with one executemany (Core, not the ORM); returns the rows written."""
    rows = chunk_rows(search_id, instance_ids)
    if rows:
        await session.execute(insert(_CHUNKS), rows)
    return len(rows)


async def search_match_ids(session: AsyncSession, search_id: str) -> list[str]:
    """The search's matched ids, sorted."""
    texts = list(
        await session.scalars(select(_C.instance_ids).where(_C.search_id == search_id).order_by(_C.seq))
    )
    return SEP.join(texts).split(SEP) if texts else []


def _members(text: str, ids: Sequence[str]) -> list[str]:
    """Those of `ids` that the chunk `text` holds."""
    if len(ids) > _SPLIT_AT:
        held = set(text.split(SEP))
        return [i for i in ids if i in held]
    padded = f"{SEP}{text}{SEP}"
    return [i for i in ids if f"{SEP}{i}{SEP}" in padded]


async def matched_by_data_request(
    session: AsyncSession, data_request_id: str, ids: Iterable[str]
) -> set[str]:
    """Those of `ids` that some search of the data request matched.

    One query reads the bounds of the chunks (not their ids) that overlap the asked ids' span; the
    chunks that may hold an asked id are then read search by search, newest first, and the reading
    stops once every id is found: the ids an eligible party asks for usually come from its latest
    search. An id matched by none costs a look at each search's one candidate chunk.
    """
    wanted = sorted(set(ids))
    if not wanted:
        return set()
    bounds = (
        await session.execute(
            select(_C.search_id, _C.seq, _C.first_id, _C.last_id)
            .join(SearchRow, SearchRow.id == _C.search_id)
            .where(
                SearchRow.data_request_id == data_request_id,
                _C.last_id >= wanted[0],
                _C.first_id <= wanted[-1],
            )
            .order_by(SearchRow.create_time.desc(), SearchRow.id.desc(), _C.seq)
        )
    ).all()
    searches: dict[str, list[tuple[int, str, str]]] = {}
    for search_id, seq, first, last in bounds:
        searches.setdefault(search_id, []).append((seq, first, last))
    found: set[str] = set()
    open_ids = wanted
    for search_id, chunks in searches.items():  # newest first (dicts keep the order of insertion)
        firsts = [first for _, first, _ in chunks]
        asked: dict[int, list[str]] = {}
        for i in open_ids:
            at = bisect_right(firsts, i) - 1
            if at >= 0 and i <= chunks[at][2]:
                asked.setdefault(chunks[at][0], []).append(i)
        for seqs in chunked(sorted(asked)):
            rows = await session.execute(
                select(_C.seq, _C.instance_ids).where(_C.search_id == search_id, _C.seq.in_(seqs))
            )
            for seq, text in rows.all():
                found.update(_members(text, asked[seq]))
        open_ids = [i for i in open_ids if i not in found]
        if not open_ids:
            break
    return found


async def searches_matching(session: AsyncSession, search_ids: Sequence[str], instance_id: str) -> set[str]:
    """Those of the searches that matched the instance: one query, a chunk per search at most.

    Per search the candidate is the last chunk whose first id is <= the instance id (an index seek on
    (search_id, first_id)); its ids come back only if its last id is >= the instance id.
    """
    if not search_ids:
        return set()
    holder = (
        select(case((_C.last_id >= instance_id, _C.instance_ids), else_=None))
        .where(_C.search_id == SearchRow.id, _C.first_id <= instance_id)
        .order_by(_C.first_id.desc())
        .limit(1)
        .correlate(SearchRow)
        .scalar_subquery()
    )
    matched: set[str] = set()
    for part in chunked(list(search_ids)):
        rows = await session.execute(select(SearchRow.id, holder).where(SearchRow.id.in_(part)))
        matched.update(search_id for search_id, text in rows.all() if text and _members(text, [instance_id]))
    return matched
