"""cluster mode: bucket leases and the replica set

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 20:50:00
"""

import sqlalchemy as sa
from alembic import op

import marketplace_server.db.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bucket_leases",
        sa.Column("bucket", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", marketplace_server.db.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("bucket"),
    )
    with op.batch_alter_table("bucket_leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bucket_leases_owner"), ["owner"], unique=False)
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=300), nullable=False),
        sa.Column("expires_at", marketplace_server.db.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("replicas")
    with op.batch_alter_table("bucket_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bucket_leases_owner"))
    op.drop_table("bucket_leases")
