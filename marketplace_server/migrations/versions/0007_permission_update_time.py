"""an index on permissions.update_time, for the cluster's event repair; joins the two 0006 heads

Revision ID: 0007_permission_update_time
Revises: 0006_one_live_permission, 0006_shared_state
Create Date: 2026-12-05 21:45:00

Every repair round of a cluster replica (marketplace_server.cluster.events) asks for the
permissions of its streams' accounts changed in the last 30 seconds: `update_time > since`.
Without an index that is a scan of the whole table every two seconds on every replica.
"""

from alembic import op

revision = "0007_permission_update_time"
down_revision = ("0006_one_live_permission", "0006_shared_state")
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("permissions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_permissions_update_time"), ["update_time"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("permissions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_permissions_update_time"))
