"""Builds the marketplace: database, keys, services, servicers, interceptors, health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from eddie.marketplace.v1 import (
    access_pb2_grpc,
    consent_pb2_grpc,
    data_request_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    instance_pb2,
    instance_pb2_grpc,
    sink_feed_pb2_grpc,
)
from eddie_common.errors import Unauthenticated
from eddie_common.interceptors import ServiceInterceptor
from eddie_common.page_tokens import PageTokenCodec
from eddie_common.serving import SERVER_OPTIONS, Lifecycle, add_health_and_reflection, bind, set_serving
from eddie_common.tokens import AUDIENCE_SINK, SigningKey, TokenIssuer, TokenVerifier
from marketplace_server import idempotency
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.aiida.outbox import OutboxWorker
from marketplace_server.auth import PUBLIC_METHODS, AccessTokenAuthenticator, marketplace_verifier
from marketplace_server.cluster.events import ClusterEventHub
from marketplace_server.cluster.leases import LeaseKeeper
from marketplace_server.cluster.node import ClusterNode, NatsSignals, connect_nats
from marketplace_server.config import Config
from marketplace_server.db.session import create_engine, create_sessionmaker, migrate
from marketplace_server.errors import DOMAIN, translate_infrastructure_error
from marketplace_server.keyring import LiveKeys, load_database_key_ring, load_key_ring
from marketplace_server.login_throttle import LoginThrottle
from marketplace_server.metrics import MarketplaceMetrics
from marketplace_server.oidc import OidcAuthenticator, OidcDiscoveryError, OidcSettings
from marketplace_server.ratelimit import RateLimitJanitor, rate_limiter
from marketplace_server.rpc.access import AccessServicer
from marketplace_server.rpc.consent import ConsentServicer
from marketplace_server.rpc.data_requests import DataRequestServicer
from marketplace_server.rpc.identity import IdentityServicer
from marketplace_server.rpc.instances import InstanceServicer
from marketplace_server.rpc.sink_feed import SinkFeedServicer
from marketplace_server.services.access import AccessService
from marketplace_server.services.activities import ActivityFeed
from marketplace_server.services.consent import ConsentService
from marketplace_server.services.data_requests import DataRequestService
from marketplace_server.services.deletion import AccountDeletion, revoke_receipts
from marketplace_server.services.events import EventHub
from marketplace_server.services.identity import IdentityService
from marketplace_server.services.instances import InstanceService
from marketplace_server.services.permissions import PermissionLedger
from marketplace_server.services.receipts import ReceiptService, ReceiptSigner
from marketplace_server.services.search import SearchService
from marketplace_server.services.sink_feed import PermissionEndFeed
from marketplace_server.services.statuses import StatusApplier
from marketplace_server.services.timeouts import DecisionTimeouts
from marketplace_server.services.watch import PermissionWatch

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,
    "eddie.marketplace.v1.InstanceService",
    "eddie.marketplace.v1.DataRequestService",
    "eddie.marketplace.v1.AccessService",
    "eddie.marketplace.v1.ConsentService",
    "eddie.marketplace.v1.SinkFeedService",
]


@dataclass
class PermissionServices:
    """Workflow 6's parts: the ledger and its events, the workers, the services and the receipts."""

    events: EventHub
    permissions: PermissionLedger
    timeouts: DecisionTimeouts
    statuses: StatusApplier
    outbox: OutboxWorker
    access: AccessService
    consent: ConsentService
    receipts: ReceiptService
    sink_feed: PermissionEndFeed


@dataclass(kw_only=True)
class Marketplace(PermissionServices):
    """A built marketplace: its server, its parts (workflow 6's among them) and shutdown hooks."""

    config: Config
    server: grpc.aio.Server
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    keys: LiveKeys
    issuer: TokenIssuer
    lifecycle: Lifecycle
    identity: IdentityService
    authenticator: AccessTokenAuthenticator
    manager: ConnectionManager
    instances: InstanceService
    data_requests: DataRequestService
    search: SearchService
    pages: PageTokenCodec
    deletion: AccountDeletion
    metrics: MarketplaceMetrics | None = None  # with --metrics-listen
    idempotency_janitor: idempotency.KeyJanitor | None = None
    cluster: ClusterNode | None = None  # with --nats-url
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def signing_key(self) -> SigningKey:
        """The key new tokens and receipts are signed with (the ring's current key)."""
        return self.keys.current

    async def start(self) -> None:
        if isinstance(self.events, ClusterEventHub):
            await self.events.start()
        if self.cluster is not None:  # its buckets first: the manager then links only their instances
            await self.cluster.start()
        if self.metrics is not None and self.config.metrics_listen is not None:
            await self.metrics.endpoint.start(self.config.metrics_listen)
            self.lifecycle.on_stop.append(self.metrics.endpoint.stop)
        await self.server.start()
        for start in self.background:
            self._tasks.append(asyncio.create_task(start()))
        await set_serving(self.lifecycle.health, SERVICE_NAMES, True)

    async def stop(self, grace: float | None = None) -> None:
        await self.lifecycle.stop(self.config.grace_period if grace is None else grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.engine.dispose()


async def create_server(config: Config) -> tuple[Marketplace, int]:
    """Builds (but does not start) the marketplace; returns it and its bound port."""
    engine = create_engine(config.effective_database_url, schema=config.database_schema)
    sessions = create_sessionmaker(engine)
    replica_id = config.replica_id or f"replica-{secrets.token_hex(4)}"
    try:
        external = await _external_identity(
            config, sessions
        )  # before any write: an unreachable IdP fails fast
        # Likewise NATS in cluster mode (--nats-url).
        signals = NatsSignals()
        nc = await connect_nats(config.nats_url, replica_id, signals) if config.nats_url else None
    except BaseException:
        await engine.dispose()
        raise
    config.data_dir.mkdir(parents=True, exist_ok=True)
    await migrate(engine)
    keys = await _key_ring(config, sessions)
    ring = keys.ring
    issuer = keys.signing(TokenIssuer(ring.current, config.issuer))

    verifier = keys.verifying(marketplace_verifier({}, config.issuer))
    authenticator = AccessTokenAuthenticator(verifier, sessions, external, keys)
    interceptor = ServiceInterceptor(
        domain=DOMAIN,
        authenticate=authenticator,
        public_methods=PUBLIC_METHODS,
        translate=translate_infrastructure_error,
    )
    metrics = MarketplaceMetrics() if config.metrics_listen is not None else None
    server = grpc.aio.server(
        interceptors=[metrics.interceptor, interceptor] if metrics else [interceptor],
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
    )

    # Cluster mode: rate limits in the database, so they hold across replicas (marketplace_server.ratelimit).
    shared = sessions if config.clustered else None
    identity = IdentityService(
        sessions,
        issuer,
        access_ttl=config.access_token_ttl,
        refresh_ttl=config.refresh_token_ttl,
        login_throttle=LoginThrottle(config.login_attempts_per_minute, sessions=shared),
    )
    # From the device key, which rotations keep: page tokens stay valid across rotations and replicas.
    pages = PageTokenCodec.from_signing_key(ring.device_key)
    # AIIDAs verify the marketplace's calls with the key RegisterInstance gave them (see keyring).
    manager = ConnectionManager(
        config, keys.device_signing(TokenIssuer(ring.device_key, config.issuer)), sessions
    )
    trust = instance_pb2.RegisterInstanceResponse(
        marketplace_public_key=ring.device_key.public_pem, marketplace_issuer=config.issuer
    )
    keys.listeners.append(lambda r: setattr(trust, "marketplace_public_key", r.device_key.public_pem))
    instances = InstanceService(
        sessions, manager, rate_limiter("claim", config.claim_attempts_per_minute, shared), pages, trust
    )
    instance_pb2_grpc.add_InstanceServiceServicer_to_server(InstanceServicer(instances), server)
    data_requests = DataRequestService(sessions, pages)
    search = SearchService(sessions, manager, config)
    if shared is not None:
        search.limiter = rate_limiter("search", config.search_rate_per_minute, shared)
    node = _cluster_node(config, nc, signals, replica_id, sessions, manager) if nc is not None else None
    if node is not None:
        search.cluster = node
    data_request_pb2_grpc.add_DataRequestServiceServicer_to_server(
        DataRequestServicer(data_requests, search), server
    )
    permissions = _add_permission_services(server, config, sessions, manager, issuer, pages, keys, node)
    deletion = AccountDeletion(permissions.permissions, authenticator, manager, permissions.events)
    deletion.on_revoked_by_deletion.append(revoke_receipts(permissions.receipts.signer))
    if isinstance(permissions.events, ClusterEventHub):  # a deletion at any replica is refused at all
        _share_deletions(permissions.events, deletion, authenticator)
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(
        IdentityServicer(identity, keys, config.issuer, deletion), server
    )
    health = add_health_and_reflection(server, SERVICE_NAMES)
    port = bind(server, config.listen, config.tls)
    lifecycle = Lifecycle(server, health, SERVICE_NAMES)
    lifecycle.before_stop.append(permissions.sink_feed.close)
    lifecycle.before_stop.append(permissions.events.close)
    app = Marketplace(
        **vars(permissions),
        config=config,
        server=server,
        engine=engine,
        sessions=sessions,
        keys=keys,
        issuer=issuer,
        lifecycle=lifecycle,
        identity=identity,
        deletion=deletion,
        authenticator=authenticator,
        manager=manager,
        instances=instances,
        data_requests=data_requests,
        search=search,
        pages=pages,
        metrics=metrics,
        cluster=node,
    )
    if metrics is not None:
        metrics.watch(manager, permissions.events, sessions)
        metrics.watch_database(engine)
        if nc is not None:
            metrics.watch_nats(nc)
        search.observers.append(metrics.on_search)
        if node is not None:
            node.on_search_incomplete.append(metrics.cluster_searches_incomplete.inc)
        if isinstance(permissions.events, ClusterEventHub):
            permissions.events.on_repaired.append(metrics.cluster_events_repaired.inc)
    workers = (permissions.outbox, permissions.timeouts, permissions.statuses)
    app.background.append(manager.start)
    app.background.append(keys.run)
    app.lifecycle.on_stop.append(keys.stop)
    if shared is not None:
        limits = RateLimitJanitor(shared)
        app.background.append(limits.run)
        app.lifecycle.on_stop.append(limits.stop)
    idempotency.RETENTION.seconds = config.idempotency_ttl
    janitor = idempotency.KeyJanitor(sessions)
    app.idempotency_janitor = janitor
    app.background.append(janitor.run)
    app.lifecycle.on_stop.append(janitor.stop)
    app.background.extend(worker.run for worker in workers)
    app.lifecycle.on_stop.extend(worker.stop for worker in workers)
    if node is not None:
        # SIGTERM: its buckets are handed over at once, before the drain; NATS is left after it (the
        # searches in flight here still gather, the workers' last events still go out).
        app.lifecycle.before_drain.append(node.handover)
        if isinstance(app.events, ClusterEventHub):
            app.lifecycle.on_stop.append(app.events.stop)
        app.lifecycle.on_stop.append(node.stop)
    app.lifecycle.on_stop.append(manager.stop)
    return app, port


def _share_deletions(
    hub: ClusterEventHub, deletion: AccountDeletion, authenticator: AccessTokenAuthenticator
) -> None:
    """Cluster mode: a deletion here is announced to the other replicas before DeleteAccount returns;
    one announced by another replica is refused here (as `AccountDeletion.delete` does locally)."""
    deletion.on_deleted.append(hub.announce_deleted)

    def deleted_elsewhere(account_id: str) -> None:
        authenticator.deny(account_id)
        hub.end_streams(account_id, Unauthenticated("the account was deleted", reason="ACCOUNT_DISABLED"))

    hub.deletion_listeners.append(deleted_elsewhere)


async def _key_ring(config: Config, sessions: async_sessionmaker[AsyncSession]) -> LiveKeys:
    """The signing key ring: in the database with PostgreSQL (shared by every replica), else in
    --data-dir (see marketplace_server.keyring)."""
    if config.keys_in_database:
        ring = await load_database_key_ring(sessions, config.data_dir, rotate=config.rotate_signing_key)
        return LiveKeys(ring, sessions, config.key_refresh_seconds)
    return LiveKeys(load_key_ring(config.data_dir, rotate=config.rotate_signing_key))


async def _external_identity(
    config: Config, sessions: async_sessionmaker[AsyncSession]
) -> OidcAuthenticator | None:
    if not config.oidc_issuer:
        return None
    if not config.oidc_audience:
        raise ValueError("--oidc-issuer needs --oidc-audience")
    settings = OidcSettings(config.oidc_issuer, config.oidc_audience, config.oidc_role_claim)
    try:
        return await OidcAuthenticator.connect(settings, sessions)
    except OidcDiscoveryError as exc:
        raise OidcDiscoveryError(
            f"OpenID Connect issuer {config.oidc_issuer} is unavailable ({exc}) — check --oidc-issuer"
        ) from None


def _cluster_node(
    config: Config,
    nc: Any,
    signals: NatsSignals,
    replica_id: str,
    sessions: async_sessionmaker[AsyncSession],
    manager: ConnectionManager,
) -> ClusterNode:
    """Cluster mode: this replica's leases and its part of the streams and searches."""
    leases = LeaseKeeper(
        sessions,
        replica_id,
        address=config.listen,
        lease_seconds=config.lease_seconds,
        renew_seconds=config.renew_seconds,
    )
    return ClusterNode(nc, leases, sessions, manager, config.cluster_name, signals)


def _add_permission_services(
    server: grpc.aio.Server,
    config: Config,
    sessions: async_sessionmaker[AsyncSession],
    manager: ConnectionManager,
    issuer: TokenIssuer,
    pages: PageTokenCodec,
    keys: LiveKeys,
    node: ClusterNode | None,
) -> PermissionServices:
    """Workflow 6: access, consent, the outbox to AIIDAs, decision timeouts and AIIDA statuses."""
    hub = EventHub(config.max_streams_per_account)
    if node is not None:  # events also reach (and come from) the other replicas' streams
        hub = ClusterEventHub(
            config.max_streams_per_account,
            node.nc,
            node.prefix,
            node.replica_id,
            sessions,
            config.event_repair_interval,
        )
    ledger = PermissionLedger(sessions, hub)
    timeouts = DecisionTimeouts(ledger)
    statuses = StatusApplier(ledger)
    outbox = OutboxWorker(sessions, manager, issuer, ledger.may_hold_access, statuses.apply)
    ledger.outbox_listeners.append(outbox.submit)
    if node is not None:  # only the owner of an instance delivers its rows
        outbox.local_instances = node.local_instances
        node.outbox = outbox
        ledger.outbox_listeners.append(node.on_outbox_rows)
    manager.status_listeners.append(statuses.on_stream_status)
    manager.up_listeners.append(outbox.on_instance_up)
    access = AccessService(ledger, timeouts, pages, config.decision_timeout)
    signer = ReceiptSigner(issuer.key, config.issuer)
    keys.listeners.append(lambda ring: setattr(signer, "key", ring.current))
    receipts = ReceiptService(sessions, signer, pages)
    consent = ConsentService(ledger, hub, timeouts, receipts.signer)
    access_pb2_grpc.add_AccessServiceServicer_to_server(
        AccessServicer(access, PermissionWatch(ledger, hub, timeouts)), server
    )
    consent_pb2_grpc.add_ConsentServiceServicer_to_server(
        ConsentServicer(consent, ActivityFeed(sessions, pages), receipts), server
    )
    # Sink tokens signed before a key rotation stay valid proofs: every key of the ring verifies.
    sink_verifier = keys.verifying(TokenVerifier({}, issuer=config.issuer, audience=AUDIENCE_SINK))
    feed = PermissionEndFeed(sessions, sink_verifier, keys)
    hub.listeners.append(feed.on_events)
    sink_feed_pb2_grpc.add_SinkFeedServiceServicer_to_server(SinkFeedServicer(feed), server)
    return PermissionServices(hub, ledger, timeouts, statuses, outbox, access, consent, receipts, feed)
