"""Wiring: create_server(config) for tests, run(config) for the program."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie_common.channels import dial
from eddie_common.cli import split_host_port
from eddie_common.interceptors import Authenticator, ServiceInterceptor
from eddie_common.logging import log_event
from eddie_common.metrics import announce_metrics
from eddie_common.mqtt import parse_broker_uri
from eddie_common.serving import (
    SERVER_OPTIONS,
    Lifecycle,
    TlsFiles,
    add_health_and_reflection,
    bind,
    run_until_signal,
)
from eddie_sink.auth import SinkAuthenticator
from eddie_sink.config import SinkConfig
from eddie_sink.ends import PermissionEnds
from eddie_sink.feed import EndFeed
from eddie_sink.keys import MarketplaceKeys
from eddie_sink.listing import ReadingPageTokens
from eddie_sink.metrics import SinkMetrics
from eddie_sink.mqtt import MqttIngest
from eddie_sink.servicer import DataSinkServicer
from eddie_sink.store import ReadingStore
from eddie_sink.writer import ReadingWriter

log = logging.getLogger(__name__)

PROGRAM = "eddie-sink"
ERROR_DOMAIN = "framework.eddie"
SERVICE_NAME = data_sink_pb2.DESCRIPTOR.services_by_name["DataSinkService"].full_name
# Keep gRPC's own reconnect backoff short so a marketplace that appears is noticed quickly.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass
class SinkApp:
    """A running sink: its server and the parts tests may look at."""

    lifecycle: Lifecycle
    store: ReadingStore
    writer: ReadingWriter
    keys: MarketplaceKeys
    port: int
    ends: PermissionEnds
    feed: EndFeed
    mqtt: MqttIngest | None = None
    metrics: SinkMetrics | None = None  # with --metrics-listen

    @property
    def server(self) -> grpc.aio.Server:
        return self.lifecycle.server

    async def stop(self, grace: float = 0.0) -> None:
        """NOT_SERVING, drain RPCs, commit queued readings, close the database."""
        await self.lifecycle.stop(grace)


def marketplace_channel(config: SinkConfig) -> grpc.aio.Channel:
    """The one channel to the marketplace: its signing keys and the permission-end feed share it."""
    ca = config.marketplace_ca
    tls = grpc.ssl_channel_credentials(ca.read_bytes()) if ca is not None else None
    return dial(config.marketplace, tls, CHANNEL_OPTIONS)


async def create_server(config: SinkConfig) -> tuple[SinkApp, int]:
    """Opens the database, starts fetching the marketplace's keys, and serves on `config.listen`."""
    store = await ReadingStore.open(config.database_path, config.jsonl)
    page_tokens = ReadingPageTokens(await store.secret("page_token_key"))
    writer = ReadingWriter(store)
    ends = await PermissionEnds.load(store)
    channel = marketplace_channel(config)
    keys = MarketplaceKeys(channel, config.marketplace, refresh_interval=config.key_refresh_interval)
    metrics = SinkMetrics() if config.metrics_listen is not None else None
    feed = EndFeed(channel, config.marketplace, ends)
    authenticate: Authenticator = SinkAuthenticator(keys)
    if metrics is not None:
        metrics.watch(writer)
        authenticate = metrics.counting_refusals(authenticate)
    interceptor = ServiceInterceptor(domain=ERROR_DOMAIN, authenticate=authenticate)
    server = grpc.aio.server(
        interceptors=[metrics.interceptor, interceptor] if metrics else [interceptor], options=SERVER_OPTIONS
    )
    data_sink_pb2_grpc.add_DataSinkServiceServicer_to_server(
        DataSinkServicer(store, writer, page_tokens, ends, metrics.on_refused if metrics else None), server
    )
    health = add_health_and_reflection(server, [SERVICE_NAME])
    try:
        port = bind(server, config.listen, TlsFiles.given(config.tls_cert, config.tls_key))
        if metrics is not None and config.metrics_listen is not None:
            await metrics.endpoint.start(config.metrics_listen)
    except Exception:
        await feed.close()
        await keys.close()
        await channel.close()
        await store.close()
        raise
    writer.start()
    keys.start()
    feed.start()
    mqtt = None
    if config.mqtt_url:
        client_id = "eddie-sink-" + (await store.secret("mqtt_client_id", 6)).hex()
        mqtt = MqttIngest(
            parse_broker_uri(config.mqtt_url),
            keys,
            store,
            writer,
            client_id=client_id,
            session_expiry=config.mqtt_session_expiry,
            ends=ends,
        )
        mqtt.start()
    await server.start()
    on_stop: list[Callable[[], Awaitable[None]]] = [
        writer.close,
        feed.close,
        keys.close,
        channel.close,
        store.close,
    ]
    if mqtt is not None:
        on_stop.insert(0, mqtt.close)  # no new MQTT readings once the writer commits its last batch
    if metrics is not None:
        on_stop.append(metrics.endpoint.stop)
    lifecycle = Lifecycle(server, health, [SERVICE_NAME], on_stop=on_stop)
    log_event(log, "sink_started", port=port, data_dir=config.data_dir, marketplace=config.marketplace)
    return SinkApp(lifecycle, store, writer, keys, port, ends, feed, mqtt=mqtt, metrics=metrics), port


async def run(config: SinkConfig) -> None:
    """Serves until SIGINT/SIGTERM."""
    app, port = await create_server(config)
    host, _ = split_host_port(config.listen)
    if app.metrics is not None and app.metrics.endpoint.port is not None:
        announce_metrics(split_host_port(str(config.metrics_listen))[0], app.metrics.endpoint.port)
    await run_until_signal(app.lifecycle, host, port, config.grace_period, PROGRAM)
