"""Authorization matrix (OWASP API1:2023, broken object-level authorization).

Every RPC of the marketplace's public services is enumerated from the generated
descriptors (an RPC without rows in MATRIX fails its own test) and called as
nobody, customer A, customer B, eligible party A and eligible party B, against
objects of both tenants. Each call must end with the exact status and
`google.rpc.ErrorInfo` reason that the contract (API.md) and the services define:

- no token: UNAUTHENTICATED / TOKEN_MISSING, except for the public methods
  (CreateAccount, CreateToken, RefreshToken, ListSigningKeys, RegisterInstance),
  which work for anyone;
- wrong role: PERMISSION_DENIED / ROLE_NOT_ALLOWED. The role check runs before
  any lookup, so it says nothing about the object;
- another tenant's private object (an instance, a stored search, a permission):
  NOT_FOUND. A "ghost" call, which names an object that does not exist, must get
  exactly the same answer: same code, reason and message once the ids are blanked;
- data requests are public to every signed-in user (API.md: GetDataRequest and
  ListDataRequests are for "anyone signed in", and browsing is the point of the
  marketplace), so their existence is no secret. The owner-only operations on
  someone else's data request (CloseDataRequest, SearchInstances, RequestAccess,
  WatchPermissions filtered to it) are PERMISSION_DENIED / NOT_OWNER, as the
  services and their own tests define;
- a refused mutation changes nothing: its target is read before the refused
  calls and again after them, before any allowed caller runs.

Streaming RPCs are judged by the status their stream ends with. When the call
is allowed, they are judged by their first messages instead, which must all be
the caller's. A separate test checks that live streams never carry another
tenant's events, and another covers the EP sink's ListReadings with real
marketplace-issued tokens.

One world, on one event loop, serves the whole package (tests.support.world
plus the objects of a second tenant and the targets that mutating rows consume;
the fixture is in conftest.py, the matrix in tests.support.authorization_matrix).
The modules run in file order: every RPC, then live streams, then the sink.
Run with `-s` for a table of rpc x target x caller -> outcome.
"""
