"""account deletion and idempotency-key expiry

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-04 20:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

import marketplace_server.db.models

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column("delete_time", marketplace_server.db.models.UtcDateTime(timezone=True), nullable=True)
        )
    op.create_index(
        op.f("ix_idempotency_keys_create_time"), "idempotency_keys", ["create_time"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_idempotency_keys_create_time"), table_name="idempotency_keys")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("delete_time")
