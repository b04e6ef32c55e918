"""Wiring: `create_server(config)` for tests, `run(config)` for the program.

Start-up order: load profiles and state (secrets are on disk before anyone
sees them), bind the port, start serving (calls are refused with
NOT_REGISTERED until registration succeeds), register in the background,
print the pairing code and `listening on HOST:PORT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health

from aiida_stub.auth import InstanceAuthenticator
from aiida_stub.config import Config
from aiida_stub.fleet import FLEET_CSV, fleet_records, round_robin, write_fleet_csv
from aiida_stub.instance import AiidaInstance, Runtime
from aiida_stub.metrics import AiidaMetrics
from aiida_stub.profile import Profile, load_profiles, shipped_profiles_dir
from aiida_stub.registration import RegistrationRejected, marketplace_channel, register_all
from aiida_stub.servicer import AiidaServiceServicer
from aiida_stub.state import InstanceRecord, StateStore
from aiida_stub.streamer import SimClock, SinkChannels
from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie.marketplace.v1 import instance_pb2_grpc
from eddie_common.cli import split_host_port
from eddie_common.collector import tune_collector
from eddie_common.interceptors import ServiceInterceptor
from eddie_common.logging import log_event
from eddie_common.metrics import announce_metrics
from eddie_common.retry import Backoff
from eddie_common.serving import (
    SERVER_OPTIONS,
    Lifecycle,
    TlsFiles,
    add_health_and_reflection,
    bind,
    run_until_signal,
)

log = logging.getLogger(__name__)

PROGRAM = "aiida-stub"
ERROR_DOMAIN = "aiida.eddie"
SERVICE_NAME = aiida_pb2.DESCRIPTOR.services_by_name["AiidaService"].full_name
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


@dataclass
class AiidaApp:
    """A running stub (one instance or a fleet) and the parts tests look at."""

    config: Config
    lifecycle: Lifecycle
    store: StateStore
    runtime: Runtime
    instances: dict[str, AiidaInstance]
    advertise: str
    marketplace: grpc.aio.Channel
    registration: asyncio.Task[None] | None = field(default=None)
    metrics: AiidaMetrics | None = field(default=None)  # with --metrics-listen

    @property
    def server(self) -> grpc.aio.Server:
        return self.lifecycle.server

    async def start(self) -> None:
        """Serves, resumes the streams of active accesses, and registers in the background."""
        if self.metrics is not None and self.config.metrics_listen is not None:
            await self.metrics.endpoint.start(self.config.metrics_listen)
            self.lifecycle.on_stop.append(self.metrics.endpoint.stop)
        await self.server.start()
        for instance in self.instances.values():
            instance.resume_streaming()
        self.registration = asyncio.get_running_loop().create_task(self._register())
        if len(self.instances) > 1:  # a fleet: a stream per instance, tuned as the marketplace is
            tune_collector(streams=len(self.instances))
        gc.freeze()  # the long-lived objects exist now; the collector need not walk them again

    async def _register(self) -> None:
        config = self.config
        stub: instance_pb2_grpc.InstanceServiceAsyncStub = instance_pb2_grpc.InstanceServiceStub(
            self.marketplace
        )
        instances = list(self.instances.values())
        await register_all(
            stub, instances, self.advertise, self.runtime.backoff, config.registration_concurrency
        )
        self.store.mark_dirty()  # the marketplace keys, once for every instance
        if config.fleet:  # written once every instance can be claimed: scripts wait for this file
            path = write_fleet_csv(config.state_dir, [i.record for i in instances])
            log_event(log, "fleet_csv_written", path=path, instances=len(instances))

    async def wait_registered(self) -> None:
        """Returns once every instance is registered (raises RegistrationRejected if refused)."""
        assert self.registration is not None, "start() first"
        await asyncio.shield(self.registration)

    async def stop(self, grace: float = 0.0) -> None:
        """NOT_SERVING, drains calls, stops streamers (accesses stay active), saves the state."""
        await self.lifecycle.stop(grace)

    async def _shutdown(self) -> None:
        if self.registration is not None:
            self.registration.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.registration
        for instance in self.instances.values():
            await instance.stop_streaming()
        await self.runtime.channels.close()
        await self.marketplace.close()
        await self.store.close()


def _profiles(config: Config) -> list[Profile]:
    if config.profiles:
        return load_profiles(config.profiles)
    shipped = shipped_profiles_dir()
    return load_profiles([shipped] if config.fleet else [shipped / "vienna-p1.toml"])


def _records(config: Config, store: StateStore) -> list[InstanceRecord]:
    if config.fleet:
        return fleet_records(store, config.id_prefix, config.fleet)
    return [store.single_instance(config.instance_id, config.pairing_code)]


def _advertise(config: Config, port: int) -> str:
    if config.advertise:
        return config.advertise
    host, _ = split_host_port(config.listen)
    if host in _WILDCARD_HOSTS:
        log_event(
            log,
            "advertise_defaulted",
            logging.WARNING,
            listen=config.listen,
            hint="set --advertise to an address the marketplace can reach",
        )
        host = "127.0.0.1"
    return f"{host}:{port}"


async def create_server(config: Config) -> tuple[AiidaApp, int]:
    """Loads profiles and state and binds the port; `start()` then serves and registers."""
    profiles = _profiles(config)
    store = StateStore.open(config.state_dir)
    records = _records(config, store)
    store.save_now()  # secrets and pairing codes are on disk before the marketplace sees them
    sink_ca = config.sink_ca.read_bytes() if config.sink_ca else None
    backoff = Backoff(config.retry_initial_delay, config.retry_max_delay)
    runtime = Runtime(store, SinkChannels(sink_ca), SimClock(config.time_scale), backoff)
    instances = {
        r.instance_id: AiidaInstance(r, p, runtime)
        for r, p in zip(records, round_robin(profiles, len(records)), strict=True)
    }
    metrics = AiidaMetrics(runtime.stats, instances) if config.metrics_listen is not None else None
    interceptor = ServiceInterceptor(domain=ERROR_DOMAIN, authenticate=InstanceAuthenticator(instances))
    server = grpc.aio.server(
        interceptors=[metrics.interceptor, interceptor] if metrics else [interceptor], options=SERVER_OPTIONS
    )
    aiida_pb2_grpc.add_AiidaServiceServicer_to_server(AiidaServiceServicer(), server)
    health_servicer: health.aio.HealthServicer = add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, config.listen, TlsFiles.given(config.tls_cert, config.tls_key, config.tls_client_ca))
    ca = config.marketplace_ca.read_bytes() if config.marketplace_ca else None
    app = AiidaApp(
        config,
        Lifecycle(server, health_servicer, [SERVICE_NAME]),
        store,
        runtime,
        instances,
        _advertise(config, port),
        marketplace_channel(config.marketplace, ca),
        metrics=metrics,
    )
    app.lifecycle.on_stop.append(app._shutdown)
    log_event(
        log,
        "aiida_started",
        instances=len(instances),
        port=port,
        advertise=app.advertise,
        marketplace=config.marketplace,
        state_dir=config.state_dir,
    )
    return app, port


def announce_pairing(app: AiidaApp) -> None:
    """Shows the owner how to claim the device: a box on stderr, one parsable line on stdout."""
    if app.config.fleet:
        csv_path = app.config.state_dir / FLEET_CSV
        print(
            f"fleet: {len(app.instances)} instances; pairing codes in {csv_path} once registered", flush=True
        )
        return
    record = next(iter(app.instances.values())).record
    lines = [
        f"AIIDA instance id: {record.instance_id}",
        f"Pairing code:      {record.pairing_code}",
        "Enter both in the marketplace to claim this device.",
    ]
    width = max(len(line) for line in lines)
    box = [
        "+" + "-" * (width + 2) + "+",
        *(f"| {line:<{width}} |" for line in lines),
        "+" + "-" * (width + 2) + "+",
    ]
    print("\n".join(box), file=sys.stderr, flush=True)
    print(f"instance id: {record.instance_id}", flush=True)
    print(f"pairing code: {record.pairing_code}", flush=True)


async def run(config: Config) -> int:
    """Serves until SIGINT/SIGTERM (exit 0) or until the marketplace rejects the registration (exit 1)."""
    app, port = await create_server(config)
    await app.start()
    announce_pairing(app)
    host, _ = split_host_port(config.listen)
    if app.metrics is not None and app.metrics.endpoint.port is not None:
        announce_metrics(split_host_port(str(config.metrics_listen))[0], app.metrics.endpoint.port)
    serving = asyncio.create_task(run_until_signal(app.lifecycle, host, port, config.grace_period, PROGRAM))
    registration = app.registration
    assert registration is not None
    await asyncio.wait({serving, registration}, return_when=asyncio.FIRST_COMPLETED)
    error = registration.exception() if registration.done() and not registration.cancelled() else None
    if error is None:
        await serving
        return 0
    if isinstance(error, RegistrationRejected):
        log_event(log, "registration_rejected", logging.ERROR, error=str(error))
    else:
        log.error("registration_failed", exc_info=error)
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    await app.stop(0.0)
    return 1
