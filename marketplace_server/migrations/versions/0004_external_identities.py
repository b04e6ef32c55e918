"""external identities: accounts of an OpenID Connect provider

Revision ID: 0004
Revises: 0001
Create Date: 2026-12-04 20:45:00
"""

import sqlalchemy as sa
from alembic import op

import marketplace_server.db.models

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "external_identities",
        sa.Column("issuer", sa.String(length=300), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("create_time", marketplace_server.db.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("issuer", "subject"),
    )
    with op.batch_alter_table("external_identities", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_external_identities_account_id"), ["account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("external_identities", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_external_identities_account_id"))
    op.drop_table("external_identities")
