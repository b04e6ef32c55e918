"""a search's match set in chunks of sorted ids (search_match_chunks), not a row per matched instance

Revision ID: 0010_search_match_chunks
Revises: 0009_instance_bucket_index
Create Date: 2026-12-05 23:00:00

`search_matches` held a row per matched instance per search: a broad search over 10,000 instances
inserted 5,000 rows (26-50 ms of the marketplace's CPU), at a million instances 500,000. Now a
search's ids are sorted (bytewise) and stored 1,000 per row, joined by "\\n", with the chunk's first
and last id for range lookups; the data request is the search's. Existing matches move over search by
search; `search_matches` is dropped.
"""

from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op

revision = "0010_search_match_chunks"
down_revision = "0009_instance_bucket_index"
branch_labels = None
depends_on = None

# Frozen here (marketplace_server.db.models as of this revision): the move must not change with later code.
CHUNK = 1000  # ids per row
SEARCHES = 100  # searches per round trip reading their ids
SEP = "\n"

matches = sa.table(
    "search_matches",
    sa.column("search_id", sa.String),
    sa.column("instance_id", sa.String),
    sa.column("data_request_id", sa.String),
)
chunks = sa.table(
    "search_match_chunks",
    sa.column("search_id", sa.String),
    sa.column("seq", sa.Integer),
    sa.column("first_id", sa.String),
    sa.column("last_id", sa.String),
    sa.column("instance_ids", sa.Text),
)
searches = sa.table("searches", sa.column("id", sa.String), sa.column("data_request_id", sa.String))


def _bound(postgres: bool) -> sa.types.TypeEngine[str]:
    # Bytewise on PostgreSQL whatever the database's locale: the ranges are Python's sort order.
    return sa.String(length=64, collation="C") if postgres else sa.String(length=64)


def _search_ids(bind: sa.Connection, column: sa.ColumnElement[str]) -> Iterator[list[str]]:
    """The distinct search ids of `column`, SEARCHES at a time (keyset on the id)."""
    after = None
    while True:
        page = sa.select(column).distinct().order_by(column).limit(SEARCHES)
        if after is not None:
            page = page.where(column > after)
        ids = list(bind.execute(page).scalars())
        if not ids:
            return
        yield ids
        after = ids[-1]


def move_matches(bind: sa.Connection) -> int:
    """Writes the chunks of every search's matches (one executemany per batch of searches); returns
    the rows written."""
    written = 0
    for page in _search_ids(bind, matches.c.search_id):
        ids: dict[str, list[str]] = {s: [] for s in page}
        for search_id, instance_id in bind.execute(
            sa.select(matches.c.search_id, matches.c.instance_id).where(matches.c.search_id.in_(page))
        ):
            ids[search_id].append(instance_id)
        rows = []
        for search_id, found in ids.items():
            found.sort()  # Python's (bytewise) order, whatever the database's collation
            for seq, start in enumerate(range(0, len(found), CHUNK)):
                part = found[start : start + CHUNK]
                rows.append(
                    {
                        "search_id": search_id,
                        "seq": seq,
                        "first_id": part[0],
                        "last_id": part[-1],
                        "instance_ids": SEP.join(part),
                    }
                )
        if rows:
            bind.execute(sa.insert(chunks), rows)
        written += len(rows)
    return written


def upgrade() -> None:
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    op.create_table(
        "search_match_chunks",
        sa.Column("search_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("first_id", _bound(postgres), nullable=False),
        sa.Column("last_id", _bound(postgres), nullable=False),
        sa.Column("instance_ids", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["search_id"], ["searches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("search_id", "seq"),
    )
    op.create_index(
        "ix_search_match_chunks_first", "search_match_chunks", ["search_id", "first_id"], unique=False
    )
    move_matches(bind)
    op.drop_index("ix_search_matches_request_instance", table_name="search_matches")
    op.drop_table("search_matches")


def downgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "search_matches",
        sa.Column("search_id", sa.String(length=32), nullable=False),
        sa.Column("instance_id", sa.String(length=64), nullable=False),
        sa.Column("data_request_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["search_id"], ["searches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("search_id", "instance_id"),
    )
    op.create_index(
        "ix_search_matches_request_instance",
        "search_matches",
        ["data_request_id", "instance_id"],
        unique=False,
    )
    for page in _search_ids(bind, chunks.c.search_id):
        found = bind.execute(
            sa.select(chunks.c.search_id, searches.c.data_request_id, chunks.c.instance_ids)
            .join(searches, searches.c.id == chunks.c.search_id)
            .where(chunks.c.search_id.in_(page))
        ).all()
        rows = [
            {"search_id": s, "instance_id": i, "data_request_id": d}
            for s, d, text in found
            for i in text.split(SEP)
        ]
        if rows:
            bind.execute(sa.insert(matches), rows)
    op.drop_index("ix_search_match_chunks_first", table_name="search_match_chunks")
    op.drop_table("search_match_chunks")
