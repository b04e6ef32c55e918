"""The three-replica fixture of test_replicas, for the other cluster test modules."""

from tests.cluster.test_replicas import replicas  # noqa: F401 (a fixture)
