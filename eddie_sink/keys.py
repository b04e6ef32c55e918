"""The marketplace's signing keys: fetched at start-up with retry, refreshed on rotation.

Tokens are verified offline. A token whose `kid` is unknown triggers at most one
refetch of `ListSigningKeys` per `refresh_interval`, then one more verification.

A verified token is remembered until its `exp` (at most `VERIFIED_CACHE_SIZE`,
forgotten when the keys change): an AIIDA presents the same sink token on every
reconnect, and a full ES256 verification (about 1.5 ms in PyJWT, most of it
base64 validation in Python) per reconnect was the largest cost of a sink under
churn (issue 15.7, bench/sink_churn.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from eddie.marketplace.v1 import identity_pb2, identity_pb2_grpc
from eddie_common.errors import Unauthenticated, Unavailable
from eddie_common.logging import log_event
from eddie_common.retry import Backoff
from eddie_common.tokens import ALGORITHM, TokenVerifier, load_public_key
from eddie_sink.reach import describe_failure

log = logging.getLogger(__name__)

REFRESH_INTERVAL_SECONDS = 30.0
VERIFIED_CACHE_SIZE = 20_000
FETCH_TIMEOUT_SECONDS = 3.0


class MarketplaceKeys:
    """Verifies marketplace-signed tokens of any audience with the current public keys."""

    def __init__(
        self, channel: grpc.aio.Channel, target: str, *, refresh_interval: float = REFRESH_INTERVAL_SECONDS
    ) -> None:
        """`channel` to the marketplace at `target` (named in the logs); its owner closes it."""
        self.target = target
        self.refresh_interval = refresh_interval
        self._channel = channel
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._issuer = ""
        self._verifiers: dict[str, TokenVerifier] = {}
        self._verified: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()  # (audience, token)
        self._ready = asyncio.Event()
        self._last_fetch = float("-inf")
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def issuer(self) -> str:
        return self._issuer

    def start(self) -> None:
        """Fetches the keys in the background, retrying until the marketplace answers."""
        if self._task is None:
            self._task = asyncio.create_task(self.fetch_until_available(), name="fetch-signing-keys")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._ready.is_set()

    async def fetch_until_available(self) -> None:
        backoff = Backoff(initial=0.1, cap=5.0)
        attempt = 0
        while not self._ready.is_set():
            attempt += 1
            try:
                await self._fetch()
            except (grpc.RpcError, ValueError) as exc:
                delay = backoff.delay(attempt)
                log_event(
                    log,
                    "signing_keys_unavailable",
                    logging.WARNING,
                    marketplace=self.target,
                    attempt=attempt,
                    retry_in=f"{delay:.2f}s",
                    error=describe_failure(exc, self._channel, self.target),
                )
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def verify(self, token: str, audience: str) -> dict[str, Any]:
        """The token's claims, or Unauthenticated; refetches keys once on an unknown `kid`."""
        cached = self._verified.get((audience, token))
        if cached is not None and time.time() < cached["exp"]:
            self._verified.move_to_end((audience, token))
            return dict(cached)
        verifier = self._verifier(audience)
        try:
            claims = verifier.verify(token)
        except Unauthenticated as exc:
            if exc.reason != "TOKEN_UNKNOWN_KEY" or not await self._refresh_for_unknown_key():
                raise
            claims = self._verifier(audience).verify(token)
        self._remember(audience, token, claims)
        return claims

    def _remember(self, audience: str, token: str, claims: dict[str, Any]) -> None:
        if not isinstance(claims.get("exp"), int | float):
            return
        self._verified[(audience, token)] = dict(claims)
        while len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)

    def _verifier(self, audience: str) -> TokenVerifier:
        if not self._ready.is_set():
            raise Unavailable(
                "the marketplace's signing keys are not loaded yet", reason="SIGNING_KEYS_UNAVAILABLE"
            )
        verifier = self._verifiers.get(audience)
        if verifier is None:
            verifier = TokenVerifier(self._keys, issuer=self._issuer, audience=audience)
            self._verifiers[audience] = verifier
        return verifier

    async def _refresh_for_unknown_key(self) -> bool:
        """Refetches the keys unless that happened within `refresh_interval`; True if refetched."""
        async with self._refresh_lock:
            if time.monotonic() - self._last_fetch < self.refresh_interval:
                return False
            try:
                await self._fetch()
            except (grpc.RpcError, ValueError) as exc:
                error = describe_failure(exc, self._channel, self.target)
                log_event(log, "signing_keys_refresh_failed", logging.WARNING, error=error)
                return False
            return True

    async def _fetch(self) -> None:
        self._last_fetch = time.monotonic()
        response = await self._stub.ListSigningKeys(
            identity_pb2.ListSigningKeysRequest(), timeout=FETCH_TIMEOUT_SECONDS, wait_for_ready=True
        )
        keys = {
            key.key_id: load_public_key(key.public_key_pem)
            for key in response.signing_keys
            if key.algorithm in ("", ALGORITHM)
        }
        if not keys or not response.issuer:
            raise ValueError("ListSigningKeys returned no usable key or no issuer")
        self._keys, self._issuer, self._verifiers = keys, response.issuer, {}
        self._verified.clear()  # a key that is gone no longer vouches for its tokens
        self._ready.set()
        log_event(log, "signing_keys_loaded", issuer=response.issuer, keys=",".join(sorted(keys)))
