"""Shared test support: running programs, test doubles, builders and assertion helpers.

conftest.py files hold only fixtures and import what they need from here; test
modules import from here too (never from a conftest).

- marketplace: a real marketplace on port 0 (`start_marketplace`, `RunningMarketplace`, `test_config`)
  and signed-up callers on it (`signup`: eddie_client Sessions, the one client helper)
- postgres: the shared PostgreSQL (`POSTGRES_URL`, reachability, statements, fresh schemas)
- expect: `expect_error` for gRPC errors and the `eventually` poller
- certs: a throwaway PKI and self-signed certificates
- access, data_requests: scenes and builders of the marketplace's workflow tests
- aiida_double, hostile_aiida, fleet: AIIDAs the marketplace talks to (in-process doubles, real stubs)
- stub, stub_messages: a running AIIDA stub with doubles of its peers, and its message builders
- sink: a running EP sink with a marketplace double that serves signing keys
- world, calls, strategies, background: the security suite's world, RPC table, hypothesis strategies
- cast: the real processes of the end-to-end tests
- oidc_provider: an external OpenID Connect issuer the marketplace trusts
- authorization, authorization_checks, authorization_matrix: the authorization matrix's world,
  expectations and rows (tests/security/authorization)
- arena: the fault tests' marketplace with honest and hostile instances (tests/security/faults)
- token_programs, token_forgery, raw_http2: the token tests' programs, forged JWTs and a raw
  HTTP/2 client (tests/security/tokens)
"""
