"""the claimed instances per bucket, kept by the database: instances.bucket and bucket_claims

Revision ID: 0008_bucket_claims
Revises: 0007_permission_update_time
Create Date: 2026-12-05 22:00:00

A cluster search's coordinator counted the claimed instances of each bucket by reading every
claimed instance id: O(N) rows per search. Now `instances.bucket` holds each id's bucket (crc32
% 256; the model sets it on insert) and `bucket_claims` the claimed count per bucket, kept by
triggers on `instances` in the writer's own transaction, whatever code (or SQL) inserts, deletes,
claims or unclaims. The coordinator reads at most 256 rows.

The triggers add or subtract one with `claimed = claimed ± 1` on the bucket's row: concurrent
writers queue on that row's lock (READ COMMITTED re-reads it), so no increment is lost.
"""

import zlib

import sqlalchemy as sa
from alembic import op

revision = "0008_bucket_claims"
down_revision = "0007_permission_update_time"
branch_labels = None
depends_on = None

# Frozen here (marketplace_server.db.buckets as of this revision): the backfill must not change
# with later code.
BUCKETS = 256
BATCH = 2000  # instance ids per backfill round trip

instances = sa.table(
    "instances",
    sa.column("instance_id", sa.String),
    sa.column("owner_id", sa.String),
    sa.column("bucket", sa.SmallInteger),
)

# PostgreSQL: one function for the three row triggers; each trigger's WHEN leaves out the rows
# that change no count (an unclaimed instance registered, a last_seen_time update never fires:
# `UPDATE OF owner_id, bucket`).
POSTGRES_FUNCTION = """
CREATE FUNCTION bucket_claims_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.owner_id IS NOT NULL THEN
        UPDATE bucket_claims SET claimed = claimed - 1 WHERE bucket = OLD.bucket;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.owner_id IS NOT NULL THEN
        INSERT INTO bucket_claims AS c (bucket, claimed) VALUES (NEW.bucket, 1)
        ON CONFLICT (bucket) DO UPDATE SET claimed = c.claimed + 1;
    END IF;
    RETURN NULL;
END
$$
"""
POSTGRES_TRIGGERS = [
    """
    CREATE TRIGGER bucket_claims_insert AFTER INSERT ON instances
    FOR EACH ROW WHEN (NEW.owner_id IS NOT NULL) EXECUTE FUNCTION bucket_claims_count()
    """,
    """
    CREATE TRIGGER bucket_claims_update AFTER UPDATE OF owner_id, bucket ON instances
    FOR EACH ROW WHEN ((OLD.owner_id IS NULL) <> (NEW.owner_id IS NULL) OR OLD.bucket <> NEW.bucket)
    EXECUTE FUNCTION bucket_claims_count()
    """,
    """
    CREATE TRIGGER bucket_claims_delete AFTER DELETE ON instances
    FOR EACH ROW WHEN (OLD.owner_id IS NOT NULL) EXECUTE FUNCTION bucket_claims_count()
    """,
]

# SQLite (one process, no cluster: nothing reads the counts there) keeps them too, so the table
# means the same on both backends. Its triggers have no procedural IF: each statement has a WHERE.
SQLITE_TRIGGERS = [
    """
    CREATE TRIGGER bucket_claims_insert AFTER INSERT ON instances
    FOR EACH ROW WHEN NEW.owner_id IS NOT NULL
    BEGIN
        INSERT INTO bucket_claims (bucket, claimed) VALUES (NEW.bucket, 1)
        ON CONFLICT (bucket) DO UPDATE SET claimed = claimed + 1;
    END
    """,
    """
    CREATE TRIGGER bucket_claims_update AFTER UPDATE OF owner_id, bucket ON instances
    FOR EACH ROW WHEN (OLD.owner_id IS NULL) <> (NEW.owner_id IS NULL) OR OLD.bucket <> NEW.bucket
    BEGIN
        UPDATE bucket_claims SET claimed = claimed - 1
        WHERE bucket = OLD.bucket AND OLD.owner_id IS NOT NULL;
        INSERT INTO bucket_claims (bucket, claimed) SELECT NEW.bucket, 1 WHERE NEW.owner_id IS NOT NULL
        ON CONFLICT (bucket) DO UPDATE SET claimed = claimed + 1;
    END
    """,
    """
    CREATE TRIGGER bucket_claims_delete AFTER DELETE ON instances
    FOR EACH ROW WHEN OLD.owner_id IS NOT NULL
    BEGIN
        UPDATE bucket_claims SET claimed = claimed - 1 WHERE bucket = OLD.bucket;
    END
    """,
]
TRIGGERS = ("bucket_claims_insert", "bucket_claims_update", "bucket_claims_delete")


def _bucket(instance_id: str) -> int:
    return zlib.crc32(instance_id.encode()) % BUCKETS


def backfill(bind: sa.Connection) -> int:
    """Sets `bucket` on every instance, BATCH ids per round trip (keyset on the id); returns how many."""
    set_bucket = (
        sa.update(instances)
        .where(instances.c.instance_id == sa.bindparam("iid"))
        .values(bucket=sa.bindparam("b"))
    )
    done, after = 0, None
    while True:
        page = sa.select(instances.c.instance_id).order_by(instances.c.instance_id).limit(BATCH)
        if after is not None:
            page = page.where(instances.c.instance_id > after)
        ids = list(bind.execute(page).scalars())
        if not ids:
            return done
        bind.execute(set_bucket, [{"iid": i, "b": _bucket(i)} for i in ids])
        done += len(ids)
        after = ids[-1]


def upgrade() -> None:
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    if postgres:
        op.add_column("instances", sa.Column("bucket", sa.SmallInteger(), nullable=True))
        backfill(bind)
        op.alter_column("instances", "bucket", existing_type=sa.SmallInteger(), nullable=False)
    else:
        # SQLite adds a NOT NULL column only with a default, and making it NOT NULL later means
        # recreating `instances`, which the permissions' foreign keys forbid while rows refer to it
        # (so does a default given as an SQL expression: alembic's batch mode then recreates the
        # table; a plain string adds the column in place). The default (never used by the models,
        # which always set the bucket) stays; alembic does not compare server defaults.
        with op.batch_alter_table("instances", schema=None) as batch_op:
            batch_op.add_column(sa.Column("bucket", sa.SmallInteger(), nullable=False, server_default="0"))
        backfill(bind)
    op.create_table(
        "bucket_claims",
        sa.Column("bucket", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("claimed", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("bucket"),
    )
    # In migrate()'s transaction, and on PostgreSQL ADD COLUMN holds `instances` locked (ACCESS
    # EXCLUSIVE) until it commits: no claim slips in between this count and the triggers.
    op.execute(
        "INSERT INTO bucket_claims (bucket, claimed) "
        "SELECT bucket, count(*) FROM instances WHERE owner_id IS NOT NULL GROUP BY bucket"
    )
    if postgres:
        op.execute(POSTGRES_FUNCTION)
        for statement in POSTGRES_TRIGGERS:
            op.execute(statement)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for trigger in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (" ON instances" if postgres else ""))
    if postgres:
        op.execute("DROP FUNCTION IF EXISTS bucket_claims_count()")
    op.drop_table("bucket_claims")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("bucket")
