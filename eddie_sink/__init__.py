"""The reference EDDIE Framework data sink of an eligible party.

AIIDAs stream readings with `DataSinkService.Publish`, authenticated by a sink
token the marketplace issued for one permission; the eligible party reads what
arrived with `DataSinkService.ListReadings` using its marketplace access token.
Tokens are verified offline against the keys `IdentityService.ListSigningKeys`
returns.
"""

from eddie_sink.config import SinkConfig, parse_config
from eddie_sink.server import SinkApp, create_server, run

__all__ = ["SinkApp", "SinkConfig", "create_server", "parse_config", "run"]
