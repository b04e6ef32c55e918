"""Running as a cluster of replicas on PostgreSQL (and NATS): bucket ownership with fencing."""
