"""an index on instances.bucket: a replica reads the claimed instances of its own buckets only

Revision ID: 0009_instance_bucket_index
Revises: 0008_bucket_claims
Create Date: 2026-12-05 22:45:00

Every cluster replica re-reads the claimed instances it should hold streams for (a resync every
15 s and after each lease it takes). It read every claimed instance of the cluster; with the
index it reads the rows of the buckets it owns: its share, not N per replica per round.
"""

from alembic import op

revision = "0009_instance_bucket_index"
down_revision = "0008_bucket_claims"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_instances_bucket", "instances", ["bucket"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_instances_bucket", table_name="instances")
