"""The bucket of an instance: what the replicas lease and serve (`cluster.leases` re-exports
`bucket_of`), what `instances.bucket` stores and `bucket_claims` counts. It lives here, not in
`cluster.leases`, because the model's column default needs it and `cluster.leases` imports the
models.
"""

from __future__ import annotations

import zlib

__all__ = ["BUCKETS", "bucket_of", "instance_bucket"]

BUCKETS = 256


def bucket_of(instance_id: str, buckets: int = BUCKETS) -> int:
    """crc32 of the UTF-8 id, modulo `buckets` (stable across replicas, restarts and versions)."""
    return zlib.crc32(instance_id.encode()) % buckets


def instance_bucket(instance_id: str) -> int:
    """The bucket stored in `instances.bucket`: `bucket_of` with the cluster's BUCKETS."""
    return bucket_of(instance_id)
