"""Who may call an instance: the marketplace it registered at, with a token for that instance.

Every AiidaService call carries `aiida-instance-id: <id>` and
`authorization: Bearer <token>`. The token must verify against the public key
and issuer the instance received from RegisterInstance, with audience `aiida`
and subject `instances/<id>`. Verified tokens are cached for a short while: the
marketplace reuses one token per stream and call, and a fleet gets 10,000
streams at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiida_stub.instance import AiidaInstance
from aiida_stub.trust import MarketplaceTrust
from eddie_common import tokens
from eddie_common.errors import Unauthenticated
from eddie_common.interceptors import caller_as

INSTANCE_ID_HEADER = "aiida-instance-id"
TOKEN_CACHE_SECONDS = 60.0
TOKEN_CACHE_SIZE = 50_000


def _headers(metadata: tuple[tuple[str, str | bytes], ...]) -> tuple[str, str | None]:
    instance_id = ""
    for key, value in metadata:
        if key == INSTANCE_ID_HEADER and isinstance(value, str):
            instance_id = value
            break
    return instance_id, tokens.bearer_token(metadata)


class InstanceAuthenticator:
    """The interceptor's `Authenticator`: returns the called instance or raises UNAUTHENTICATED."""

    def __init__(self, instances: Mapping[str, AiidaInstance]) -> None:
        self._instances = instances
        # token -> (instance id, trust it verified against, cached until)
        self._verified: dict[str, tuple[str, MarketplaceTrust, float]] = {}

    async def __call__(self, method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> AiidaInstance:
        instance_id, token = _headers(metadata)
        if not instance_id:
            raise Unauthenticated(f"missing {INSTANCE_ID_HEADER} metadata", reason="INSTANCE_ID_MISSING")
        instance = self._instances.get(instance_id)
        if instance is None:
            raise Unauthenticated("unknown instance", reason="UNKNOWN_INSTANCE")
        trust = instance.trust
        if trust is None:
            raise Unauthenticated("instance not registered at a marketplace yet", reason="NOT_REGISTERED")
        if not token:
            raise Unauthenticated("missing bearer token", reason="TOKEN_MISSING")
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None and cached[0] == instance_id and cached[1] is trust and cached[2] > now:
            return instance
        claims = trust.verifier.verify(token)
        if claims["sub"] != f"instances/{instance_id}":
            raise Unauthenticated("token is for another instance", reason="INSTANCE_MISMATCH")
        self._remember(token, instance_id, trust, min(float(claims["exp"]), now + TOKEN_CACHE_SECONDS), now)
        return instance

    def _remember(
        self, token: str, instance_id: str, trust: MarketplaceTrust, until: float, now: float
    ) -> None:
        if len(self._verified) >= TOKEN_CACHE_SIZE:
            self._verified = {t: e for t, e in self._verified.items() if e[2] > now}
            if len(self._verified) >= TOKEN_CACHE_SIZE:  # all fresh: forget the older half
                self._verified = dict(list(self._verified.items())[TOKEN_CACHE_SIZE // 2 :])
        self._verified[token] = (instance_id, trust, until)


def current_instance() -> AiidaInstance:
    """The instance the current call was authenticated for (set by the interceptor)."""
    instance = caller_as(AiidaInstance)
    if instance is None:
        raise Unauthenticated("no instance authenticated for this call", reason="UNAUTHENTICATED")
    return instance
