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
from cryptography.hazmat.primitives.asymmetric import ec
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
from marketplace_server.cluster.node import ClusterNode, connect_nats
from marketplace_server.config import Config
from marketplace_server.db.session import create_engine, create_sessionmaker, migrate
from marketplace_server.errors import DOMAIN, translate_infrastructure_error
from marketplace_server.keyring import load_key_ring
from marketplace_server.login_throttle import LoginThrottle
from marketplace_server.metrics import MarketplaceMetrics
from marketplace_server.oidc import OidcAuthenticator, OidcDiscoveryError, OidcSettings
from marketplace_server.ratelimit import RateLimiter
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


@dataclass(frozen=True)
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


@dataclass
class Marketplace:
    """A built marketplace: its server, its parts and shutdown hooks."""

    config: Config
    server: grpc.aio.Server
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    signing_key: SigningKey
    issuer: TokenIssuer
    lifecycle: Lifecycle
    identity: IdentityService
    authenticator: AccessTokenAuthenticator
    manager: ConnectionManager
    instances: InstanceService
    data_requests: DataRequestService
    search: SearchService
    pages: PageTokenCodec
    events: EventHub
    permissions: PermissionLedger
    timeouts: DecisionTimeouts
    statuses: StatusApplier
    outbox: OutboxWorker
    access: AccessService
    consent: ConsentService
    receipts: ReceiptService
    deletion: AccountDeletion
    sink_feed: PermissionEndFeed
    metrics: MarketplaceMetrics | None = None  # with --metrics-listen
    idempotency_janitor: idempotency.KeyJanitor | None = None
    cluster: ClusterNode | None = None  # with --nats-url
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

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
        nc = await connect_nats(config.nats_url, replica_id) if config.nats_url else None
    except BaseException:
        await engine.dispose()
        raise
    config.data_dir.mkdir(parents=True, exist_ok=True)
    ring = load_key_ring(config.data_dir, rotate=config.rotate_signing_key)
    signing_key = ring.current
    issuer = TokenIssuer(signing_key, config.issuer)
    await migrate(engine)

    verifier = marketplace_verifier({k.key_id: k.public_key for k in ring.keys}, config.issuer)
    authenticator = AccessTokenAuthenticator(verifier, sessions, external)
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

    identity = IdentityService(
        sessions,
        issuer,
        access_ttl=config.access_token_ttl,
        refresh_ttl=config.refresh_token_ttl,
        login_throttle=LoginThrottle(config.login_attempts_per_minute),
    )
    pages = PageTokenCodec.from_signing_key(signing_key)
    # AIIDAs verify the marketplace's calls with the key RegisterInstance gave them (see keyring).
    manager = ConnectionManager(config, TokenIssuer(ring.device_key, config.issuer), sessions)
    trust = instance_pb2.RegisterInstanceResponse(
        marketplace_public_key=ring.device_key.public_pem, marketplace_issuer=config.issuer
    )
    instances = InstanceService(
        sessions, manager, RateLimiter(config.claim_attempts_per_minute), pages, trust
    )
    instance_pb2_grpc.add_InstanceServiceServicer_to_server(InstanceServicer(instances), server)
    data_requests = DataRequestService(sessions, pages)
    search = SearchService(sessions, manager, config)
    node = _cluster_node(config, nc, replica_id, sessions, manager) if nc is not None else None
    if node is not None:
        search.cluster = node
    data_request_pb2_grpc.add_DataRequestServiceServicer_to_server(
        DataRequestServicer(data_requests, search), server
    )
    public_keys = {k.key_id: k.public_key for k in ring.keys}
    permissions = _add_permission_services(
        server, config, sessions, manager, issuer, pages, public_keys, node
    )
    deletion = AccountDeletion(permissions.permissions, authenticator, manager, permissions.events)
    deletion.on_revoked_by_deletion.append(revoke_receipts(permissions.receipts.signer))
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(
        IdentityServicer(identity, ring.keys, config.issuer, deletion), server
    )
    health = add_health_and_reflection(server, SERVICE_NAMES)
    port = bind(server, config.listen, config.tls)
    lifecycle = Lifecycle(server, health, SERVICE_NAMES)
    lifecycle.before_stop.append(permissions.sink_feed.close)
    app = Marketplace(
        config,
        server,
        engine,
        sessions,
        signing_key,
        issuer,
        lifecycle,
        identity=identity,
        deletion=deletion,
        authenticator=authenticator,
        manager=manager,
        instances=instances,
        data_requests=data_requests,
        search=search,
        pages=pages,
        events=permissions.events,
        permissions=permissions.permissions,
        timeouts=permissions.timeouts,
        statuses=permissions.statuses,
        outbox=permissions.outbox,
        access=permissions.access,
        consent=permissions.consent,
        receipts=permissions.receipts,
        sink_feed=permissions.sink_feed,
        metrics=metrics,
        cluster=node,
    )
    if metrics is not None:
        metrics.watch(manager, permissions.events, sessions)
        metrics.watch_database(engine)
        if nc is not None:
            metrics.watch_nats(nc)
        search.observers.append(metrics.on_search)
    workers = (permissions.outbox, permissions.timeouts, permissions.statuses)
    app.background.append(manager.start)
    idempotency.RETENTION.seconds = config.idempotency_ttl
    janitor = idempotency.KeyJanitor(sessions)
    app.idempotency_janitor = janitor
    app.background.append(janitor.run)
    app.lifecycle.on_stop.append(janitor.stop)
    app.background.extend(worker.run for worker in workers)
    app.lifecycle.on_stop.extend(worker.stop for worker in workers)
    if node is not None:  # hands its buckets over at once, before the workers stop
        app.lifecycle.on_stop.insert(0, node.stop)
    app.lifecycle.on_stop.append(manager.stop)
    return app, port


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
    return ClusterNode(nc, leases, sessions, manager, config.cluster_name)


def _add_permission_services(
    server: grpc.aio.Server,
    config: Config,
    sessions: async_sessionmaker[AsyncSession],
    manager: ConnectionManager,
    issuer: TokenIssuer,
    pages: PageTokenCodec,
    public_keys: dict[str, ec.EllipticCurvePublicKey],
    node: ClusterNode | None,
) -> PermissionServices:
    """Workflow 6: access, consent, the outbox to AIIDAs, decision timeouts and AIIDA statuses."""
    hub = EventHub(config.max_streams_per_account)
    if node is not None:  # events also reach (and come from) the other replicas' streams
        hub = ClusterEventHub(config.max_streams_per_account, node.nc, node.prefix, node.replica_id)
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
    receipts = ReceiptService(sessions, ReceiptSigner(issuer.key, config.issuer), pages)
    consent = ConsentService(ledger, hub, timeouts, receipts.signer)
    access_pb2_grpc.add_AccessServiceServicer_to_server(
        AccessServicer(access, PermissionWatch(ledger, hub, timeouts)), server
    )
    consent_pb2_grpc.add_ConsentServiceServicer_to_server(
        ConsentServicer(consent, ActivityFeed(sessions, pages), receipts), server
    )
    # Sink tokens signed before a key rotation stay valid proofs: every key of the ring verifies.
    sink_verifier = TokenVerifier(public_keys, issuer=config.issuer, audience=AUDIENCE_SINK)
    feed = PermissionEndFeed(sessions, sink_verifier)
    hub.listeners.append(feed.on_events)
    sink_feed_pb2_grpc.add_SinkFeedServiceServicer_to_server(SinkFeedServicer(feed), server)
    return PermissionServices(hub, ledger, timeouts, statuses, outbox, access, consent, receipts, feed)
