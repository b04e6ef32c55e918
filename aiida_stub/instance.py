"""One AIIDA instance at run time: its profile, its marketplace trust, and its data accesses.

A fleet process holds many of these; the servicer routes each call to one by
the `aiida-instance-id` header. State changes are persisted through the shared
`StateStore` and reported as `DataAccessStatus` on the instance's newest
Connect stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from aiida_stub.accesses import stream_plan, validate_data_access
from aiida_stub.matcher import find_source
from aiida_stub.meter import meter_for
from aiida_stub.mqtt import MqttAccessStreamer
from aiida_stub.profile import Profile
from aiida_stub.state import AccessRecord, InstanceRecord, StateStore, StateValue
from aiida_stub.streamer import AccessStreamer, SimClock, SinkChannels, StreamStats
from aiida_stub.trust import MarketplaceTrust
from eddie.aiida.v1 import aiida_pb2
from eddie_common.errors import InvalidArgument, NotFound
from eddie_common.ids import is_permission_id
from eddie_common.logging import log_event
from eddie_common.retry import Backoff

log = logging.getLogger(__name__)

State = aiida_pb2.DataAccess.State
UNFULFILLABLE_REASON = "the household's data cannot serve this data need"
DEFAULT_REVOKE_REASON = "revoked"


class StatusSink(Protocol):
    """Where an instance's status events go: its newest Connect stream."""

    def push(self, status: aiida_pb2.DataAccessStatus) -> None: ...


@dataclass
class Runtime:
    """What every instance of one process shares."""

    store: StateStore
    channels: SinkChannels
    clock: SimClock
    backoff: Backoff
    stats: StreamStats = field(default_factory=StreamStats)


class AiidaInstance:
    """One registered (or registering) AIIDA."""

    def __init__(self, record: InstanceRecord, profile: Profile, runtime: Runtime) -> None:
        self.record = record
        self.profile = profile
        self.runtime = runtime
        self.trust: MarketplaceTrust | None = None  # set by a successful registration
        self._status_sink: StatusSink | None = None
        self._streamers: dict[str, AccessStreamer] = {}

    @property
    def instance_id(self) -> str:
        return self.record.instance_id

    def accept_registration(self, trust: MarketplaceTrust) -> None:
        """Trusts the marketplace's key from now on (the caller saves the state once for all instances)."""
        self.trust = trust
        self.record.marketplace_public_key = trust.public_key_pem
        self.record.marketplace_issuer = trust.issuer

    # -- status events ---------------------------------------------------------------

    def attach_status_sink(self, sink: StatusSink) -> None:
        """Makes `sink` the newest stream and reports every access on it."""
        self._status_sink = sink
        for access in self.record.accesses.values():
            sink.push(access.status())

    def detach_status_sink(self, sink: StatusSink) -> None:
        if self._status_sink is sink:
            self._status_sink = None

    def _report(self, access: AccessRecord) -> None:
        log_event(
            log,
            "data_access_state",
            instance=self.instance_id,
            permission=access.permission_id,
            state=State.Name(access.state),
            reason=access.state_reason,
        )
        if self._status_sink is not None:
            self._status_sink.push(access.status())

    # -- data accesses ---------------------------------------------------------------

    def get_access(self, permission_id: str) -> AccessRecord:
        access = self.record.accesses.get(permission_id)
        if access is None:
            raise NotFound(f"no data access for permission {permission_id!r}", reason="DATA_ACCESS_NOT_FOUND")
        return access

    def list_accesses(self) -> list[AccessRecord]:
        return list(self.record.accesses.values())

    async def configure_access(self, request: aiida_pb2.ConfigureDataAccessRequest) -> AccessRecord:
        """Idempotent by permission id: a known id returns the access unchanged (revoked stays revoked)."""
        validate_data_access(request.data_access, request.HasField("data_access"))
        proto = request.data_access
        existing = self.record.accesses.get(proto.permission_id)
        if existing is not None:
            return existing
        access = AccessRecord(
            permission_id=proto.permission_id,
            state=State.STATE_ACTIVE,
            data_need=proto.data_need,
            sink_uri=proto.sink_uri,
            sink_token=proto.sink_token,
            start_us=proto.start_time.ToMicroseconds(),
            end_us=proto.end_time.ToMicroseconds(),
            configured_at_us=time.time_ns() // 1000,
        )
        source = find_source(self.profile, proto.data_need, time.time())
        if source is None:
            access.state, access.state_reason = State.STATE_UNFULFILLABLE, UNFULFILLABLE_REASON
        else:
            access.source_index = self.profile.sources.index(source)
        self.record.accesses[access.permission_id] = access
        # Shielded: if the caller goes away while the state is written, the call is cancelled, but the
        # access is stored by then; unstarted, it would stay ACTIVE with no data (a retried configure
        # finds it and returns it as it is).
        await asyncio.shield(self._activate(access))
        return access

    async def _activate(self, access: AccessRecord) -> None:
        await self.runtime.store.commit()
        self._report(access)
        if access.state == State.STATE_ACTIVE:
            self._start_streamer(access)

    async def revoke_access(self, permission_id: str, reason: str) -> AccessRecord:
        """Idempotent; an unknown id is recorded as revoked so a later configure cannot revive it."""
        if not is_permission_id(permission_id):
            raise InvalidArgument.for_field("permission_id", "required: 1-128 of [A-Za-z0-9_-]")
        access = self.record.accesses.get(permission_id)
        if access is not None and access.terminal:
            return access
        if access is None:
            access = AccessRecord(permission_id=permission_id, state=State.STATE_REVOKED)
            self.record.accesses[permission_id] = access
        access.state, access.state_reason = State.STATE_REVOKED, reason or DEFAULT_REVOKE_REASON
        streamer = self._streamers.pop(permission_id, None)
        if streamer is not None:
            await streamer.stop()
        await self.runtime.store.commit()
        self._report(access)
        return access

    def _finish(self, access: AccessRecord, state: StateValue, reason: str) -> None:
        """A streamer ended on its own: the window is over, or the sink refused for good."""
        self._streamers.pop(access.permission_id, None)
        if access.terminal:
            return
        access.state, access.state_reason = state, reason
        self.runtime.store.mark_dirty()
        self._report(access)

    def _start_streamer(self, access: AccessRecord) -> None:
        rt = self.runtime
        kind = MqttAccessStreamer if access.sink_uri.startswith(("mqtt://", "mqtts://")) else AccessStreamer
        streamer = kind(
            access,
            stream_plan(self.profile, access, access.source_index),
            meter_for(self.profile.seed),
            rt.channels,
            rt.clock,
            on_progress=rt.store.mark_dirty,
            on_finished=lambda state, reason: self._finish(access, state, reason),
            backoff=rt.backoff,
            stats=rt.stats,
        )
        self._streamers[access.permission_id] = streamer
        streamer.start()

    def resume_streaming(self) -> None:
        """Restarts the streamers of active accesses after a restart."""
        for access in self.record.accesses.values():
            if access.state != State.STATE_ACTIVE or access.permission_id in self._streamers:
                continue
            source = (
                self.profile.sources[access.source_index]
                if access.source_index < len(self.profile.sources)
                else None
            )
            if source is None or not set(access.data_need.data_tags) <= set(source.data_tags):
                self._finish(
                    access, State.STATE_FAILED, "the household profile changed; the access cannot be served"
                )
                continue
            self._start_streamer(access)

    async def stop_streaming(self) -> None:
        """Stops every streamer (shutdown); the accesses stay active and resume at the next start."""
        streamers, self._streamers = list(self._streamers.values()), {}
        await asyncio.gather(*(streamer.stop() for streamer in streamers))
