"""Shared test support: running programs, test doubles, builders and assertion helpers.

conftest.py files hold only fixtures and import what they need from here; test
modules import from here too (never from a conftest).

- marketplace: a real marketplace on port 0 (`start_marketplace`, `RunningMarketplace`, `test_config`)
- postgres: the shared PostgreSQL (`POSTGRES_URL`, reachability, statements, fresh schemas)
- expect: `expect_error` for gRPC errors and the `eventually` poller
- certs: a throwaway PKI and self-signed certificates
- access, data_requests: scenes and builders of the marketplace's workflow tests
- aiida_double, hostile_aiida, fleet: AIIDAs the marketplace talks to (in-process doubles, real stubs)
- stub, stub_messages: a running AIIDA stub with doubles of its peers, and its message builders
- sink: a running EP sink with a marketplace double that serves signing keys
- world, calls, strategies, background: the security suite's world, RPC table, hypothesis strategies
- cast: the real processes of the end-to-end tests
"""
