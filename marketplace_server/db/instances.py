"""Reads of the instance registry shared by the layers that keep the AIIDA streams."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from marketplace_server.db.models import InstanceRow

__all__ = ["claimed_instances"]


async def claimed_instances(
    sessions: async_sessionmaker[AsyncSession], buckets: Collection[int] | None = None
) -> Sequence[Row[str, str]]:
    """(instance_id, address) of every claimed instance (one with an owner): the ones to stream to;
    with `buckets`, only those of these cluster buckets (`instances.bucket`, indexed)."""
    claimed = select(InstanceRow.instance_id, InstanceRow.address).where(InstanceRow.owner_id.is_not(None))
    if buckets is not None:
        if not buckets:
            return []
        claimed = claimed.where(InstanceRow.bucket.in_(sorted(buckets)))
    async with sessions() as session:
        return (await session.execute(claimed)).all()
