"""trust: consent receipts, withheld searches, the activity feed's search index

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 20:50:00
"""

import sqlalchemy as sa
from alembic import op

import marketplace_server.db.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consent_receipts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("customer_id", sa.String(length=32), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("permission_id", sa.String(length=32), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("jws", sa.Text(), nullable=False),
        sa.Column("create_time", marketplace_server.db.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("consent_receipts", schema=None) as batch_op:
        batch_op.create_index(
            "ux_consent_receipts_customer_sequence", ["customer_id", "sequence"], unique=True
        )
        batch_op.create_index(
            batch_op.f("ix_consent_receipts_permission_id"), ["permission_id"], unique=False
        )
    with op.batch_alter_table("searches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("withheld", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index("ix_searches_create_time_id", ["create_time", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("searches", schema=None) as batch_op:
        batch_op.drop_index("ix_searches_create_time_id")
        batch_op.drop_column("withheld")
    with op.batch_alter_table("consent_receipts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consent_receipts_permission_id"))
        batch_op.drop_index("ux_consent_receipts_customer_sequence")
    op.drop_table("consent_receipts")
