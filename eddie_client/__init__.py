"""A small typed client helper over the generated stubs, shared by the demo, examples and benchmarks.

async with MarketplaceClient("127.0.0.1:50051") as mp:
    ep = await mp.sign_up(ROLE_ELIGIBLE_PARTY, "ep@example.org", PASSWORD, "Wien Energie")
    request = await ep.create_data_request(title=..., purpose=..., data_need=data_need(...))
    matches, summary = await ep.search(request.name)
"""

from eddie_client.client import (
    ROLE_CUSTOMER,
    ROLE_ELIGIBLE_PARTY,
    MarketplaceClient,
    Session,
    data_need,
    duration,
    log_in,
    sign_up,
)

__all__ = [
    "ROLE_CUSTOMER",
    "ROLE_ELIGIBLE_PARTY",
    "MarketplaceClient",
    "Session",
    "data_need",
    "duration",
    "log_in",
    "sign_up",
]
