"""one live permission per (data request, instance): a partial unique index

Revision ID: 0006_one_live_permission
Revises: 0002, 0003, 0005
Create Date: 2026-12-04 23:30:00

API.md (RequestAccess): an instance that already has a live (PENDING, ACCEPTED or
ACTIVE) permission for a data request gets that permission back, not a second one.
The index makes that hold under concurrent requests, on any replica.

A database written before this migration may hold duplicates (two concurrent
RequestAccess calls could both insert). Of each group of live duplicates the one
furthest along is kept (ACTIVE before ACCEPTED before PENDING: data the customer
approved keeps flowing), the newest among equals; the others are ended as
TERMINATED with a reason naming the kept one, with their transition rows, and an
AIIDA that may hold an access for an ended one is told through the outbox (a revoke
row; an undelivered configure is dropped), as `TerminatePermission` does.
"""

from collections import defaultdict
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import marketplace_server.db.models

revision = "0006_one_live_permission"
down_revision = ("0002", "0003", "0005")
branch_labels = None
depends_on = None

# Permission.State numbers as of this revision (eddie.marketplace.v1).
PENDING, ACCEPTED, ACTIVE, TERMINATED = 1, 2, 3, 8
LIVE = (PENDING, ACCEPTED, ACTIVE)
RANK = {PENDING: 0, ACCEPTED: 1, ACTIVE: 2}
LIVE_WHERE = "state IN (1, 2, 3)"
INDEX = "ux_permissions_live"

_time = marketplace_server.db.models.UtcDateTime(timezone=True)
permissions = sa.table(
    "permissions",
    sa.column("id", sa.String),
    sa.column("seq", sa.Integer),
    sa.column("data_request_id", sa.String),
    sa.column("instance_id", sa.String),
    sa.column("state", sa.Integer),
    sa.column("state_reason", sa.String),
    sa.column("update_time", _time),
)
transitions = sa.table(
    "permission_transitions",
    sa.column("permission_id", sa.String),
    sa.column("from_state", sa.Integer),
    sa.column("to_state", sa.Integer),
    sa.column("reason", sa.String),
    sa.column("time", _time),
)
outbox = sa.table(
    "outbox",
    sa.column("permission_id", sa.String),
    sa.column("instance_id", sa.String),
    sa.column("kind", sa.String),
    sa.column("payload", sa.JSON),
    sa.column("attempts", sa.Integer),
    sa.column("next_attempt_time", _time),
    sa.column("last_error", sa.String),
    sa.column("done", sa.Boolean),
    sa.column("create_time", _time),
)


def end_duplicates(bind: sa.Connection) -> int:
    """Ends every live permission duplicating another of its (data request, instance); returns how many."""
    rows = bind.execute(
        sa.select(
            permissions.c.id,
            permissions.c.seq,
            permissions.c.data_request_id,
            permissions.c.instance_id,
            permissions.c.state,
        ).where(permissions.c.state.in_(LIVE))
    ).all()
    groups: dict[tuple[str, str], list[sa.Row[tuple[str, int, str, str, int]]]] = defaultdict(list)
    for row in rows:
        groups[(row.data_request_id, row.instance_id)].append(row)
    now = datetime.now(UTC)
    ended = 0
    for group in groups.values():
        if len(group) < 2:
            continue
        kept = max(group, key=lambda r: (RANK[r.state], r.seq))
        reason = f"a duplicate of permissions/{kept.id}, the one live permission of this data request here"
        for row in group:
            if row.id == kept.id:
                continue
            bind.execute(
                permissions.update()
                .where(permissions.c.id == row.id, permissions.c.state == row.state)
                .values(state=TERMINATED, state_reason=reason, update_time=now)
            )
            bind.execute(
                transitions.insert().values(
                    permission_id=row.id, from_state=row.state, to_state=TERMINATED, reason=reason, time=now
                )
            )
            if row.state in (ACCEPTED, ACTIVE):  # the AIIDA may hold (or be about to get) the access
                bind.execute(
                    outbox.update()
                    .where(
                        outbox.c.permission_id == row.id,
                        outbox.c.kind == "configure",
                        outbox.c.done.is_(False),
                    )
                    .values(done=True, last_error="superseded by a revoke")
                )
                bind.execute(
                    outbox.insert().values(
                        permission_id=row.id,
                        instance_id=row.instance_id,
                        kind="revoke",
                        payload={"reason": reason},
                        attempts=0,
                        next_attempt_time=now,
                        last_error="",
                        done=False,
                        create_time=now,
                    )
                )
            ended += 1
    return ended


def upgrade() -> None:
    end_duplicates(op.get_bind())
    op.create_index(
        INDEX,
        "permissions",
        ["data_request_id", "instance_id"],
        unique=True,
        sqlite_where=sa.text(LIVE_WHERE),
        postgresql_where=sa.text(LIVE_WHERE),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="permissions")
