"""One module per workflow; importing this package adds every command to the `eddie` group."""

from eddie_cli.app import cli
from eddie_cli.commands import access, account, completion, consent, data_requests, instances, search, trust

__all__ = [
    "access",
    "account",
    "cli",
    "completion",
    "consent",
    "data_requests",
    "instances",
    "search",
    "trust",
]
