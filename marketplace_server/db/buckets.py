"""The bucket of an instance, as stored in `instances.bucket` and counted in `bucket_claims`.

It must equal `marketplace_server.cluster.leases.bucket_of` with its default of BUCKETS
(tests/cluster/test_bucket_claims.py checks it): the replicas lease and serve the buckets
by that function, and the coordinator of a search counts each bucket's claimed instances
from `bucket_claims`. It lives here, not there, because the model's column default needs it
and `cluster.leases` imports the models.
"""

from __future__ import annotations

import zlib

__all__ = ["BUCKETS", "instance_bucket"]

BUCKETS = 256


def instance_bucket(instance_id: str) -> int:
    """crc32 of the UTF-8 id, modulo BUCKETS (stable across replicas, restarts and versions)."""
    return zlib.crc32(instance_id.encode()) % BUCKETS
