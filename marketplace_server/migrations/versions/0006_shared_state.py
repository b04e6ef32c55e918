"""shared state of a cluster: the signing key ring and rate-limit buckets in the database

Revision ID: 0006_shared_state
Revises: 0005
Create Date: 2026-12-04 23:40:00
"""

import sqlalchemy as sa
from alembic import op

import marketplace_server.db.models

revision = "0006_shared_state"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("private_key_pem", sa.Text(), nullable=False),
        sa.Column("create_time", marketplace_server.db.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("retire_time", marketplace_server.db.models.UtcDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_id"),
    )
    # UNLOGGED on PostgreSQL: no WAL for a counter that is fine to lose (a crash empties it, which
    # resets the limits; standbys do not have it), and a take commits without waiting for a flush.
    unlogged = ["UNLOGGED"] if op.get_bind().dialect.name == "postgresql" else []
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("level", sa.Float(), nullable=False),
        sa.Column("updated_at", marketplace_server.db.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("idle_at", marketplace_server.db.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
        prefixes=unlogged,
    )
    with op.batch_alter_table("rate_limits", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rate_limits_idle_at"), ["idle_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rate_limits", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rate_limits_idle_at"))
    op.drop_table("rate_limits")
    op.drop_table("signing_keys")
