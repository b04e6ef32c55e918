"""The connection manager: one Connect stream per claimed instance, fan-out, unary calls.

Thousands of instances per process: no thread per instance, one shared channel
per distinct address, bounded per-stream send queues, bounded concurrent
connects, and last-seen times written to the database in batches.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterable
from datetime import UTC, datetime
from typing import Any

import grpc
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie.energy.v1 import energy_pb2
from eddie_common.channels import dial
from eddie_common.logging import log_event
from eddie_common.retry import Backoff
from eddie_common.tokens import AUDIENCE_AIIDA, TokenIssuer
from marketplace_server.aiida.fanout import SearchTally
from marketplace_server.aiida.heap import HeapFreezer
from marketplace_server.aiida.link import CONNECT_METHOD, InstanceLink
from marketplace_server.config import Config
from marketplace_server.db.chunks import chunked
from marketplace_server.db.instances import claimed_instances
from marketplace_server.db.models import InstanceRow
from marketplace_server.resources import instance_name

log = logging.getLogger(__name__)

INSTANCE_HEADER = "aiida-instance-id"
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
]

# A busy or answering instance's last_seen_time is written at most this often (the connection
# manager keeps the exact time in memory and GetInstance shows it where the stream is held): every
# connected instance answers within a ping round, and writing each one every round is N/30 row
# updates a second (33,000 at a million).
LAST_SEEN_WRITE_SECONDS = 300.0

# Listeners run on the link's reader and must not block: they queue, or start a task they keep.
StatusListener = Callable[[str, aiida_pb2.DataAccessStatus], None]
UpListener = Callable[[str], None]


class ConnectionManager:
    """Keeps a Connect stream to every claimed instance and routes what comes back."""

    def __init__(
        self, config: Config, issuer: TokenIssuer, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        self.config = config
        self.issuer = issuer
        self.sessions = sessions
        self.reconnect_backoff = Backoff(initial=0.5, cap=config.reconnect_max_backoff)
        # How long opening a stream (the first ping and its pong) may take. Generous on purpose:
        # after a replica dies, the new owners open thousands of streams at once to AIIDAs that are
        # busy answering searches; at 10 s a few hundred of 10,000 timed out under that load, backed
        # off, timed out again and stayed unreachable for a minute (the bench's kill phase). A slow
        # peer is better waited for than retried from scratch.
        self.connect_timeout = 30.0
        self.connect_slots = asyncio.Semaphore(256)
        self.links: dict[str, InstanceLink] = {}
        self.connected_count = 0  # links up now (kept by on_link_up / on_link_down: a scrape is O(1))
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._connect_methods: dict[str, Any] = {}
        self._tallies: dict[str, SearchTally] = {}
        self._seen: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.status_listeners: list[StatusListener] = []
        self.up_listeners: list[UpListener] = []
        self.heap = HeapFreezer(streams=lambda: len(self.links))
        # Cluster mode (marketplace_server.cluster.node): which instances this replica holds
        # streams for, and where an ensure for another replica's instance goes.
        self.owns: Callable[[str], bool] = _everything
        self.forward: Callable[[str, str], None] | None = None

    # --- lifecycle ---

    async def start(self) -> None:
        """Connects to every claimed instance."""
        rows = await claimed_instances(self.sessions)
        for instance_id, address in rows:
            if self.owns(instance_id) and instance_id not in self.links:  # a cluster may have linked it
                self.link(instance_id, address)
        self._tasks.append(asyncio.create_task(self._flush_last_seen_forever()))
        self._tasks.append(asyncio.create_task(self._ping_forever()))
        log_event(log, "connection_manager_started", instances=len(rows))

    async def stop(self) -> None:
        self.heap.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(link.stop() for link in self.links.values()), return_exceptions=True)
        await self._flush_last_seen()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._connect_methods.clear()

    def ensure(self, instance_id: str, address: str) -> None:
        """Connects a newly claimed instance, or reconnects one that re-registered.

        In a cluster an instance another replica owns is forwarded to its owner.
        """
        if self.owns(instance_id):
            self.link(instance_id, address)
        elif self.forward is not None:
            self.forward(instance_id, address)

    def link(self, instance_id: str, address: str) -> None:
        """Holds (or readdresses) this replica's stream to the instance."""
        link = self.links.get(instance_id)
        if link is None:
            link = InstanceLink(self, instance_id, address)
            self.links[instance_id] = link
            link.start()
        elif link.address != address or not link.connected:
            link.readdress(address)

    async def release(self, instance_ids: Iterable[str]) -> None:
        """Stops the streams of instances this replica no longer owns (a lost bucket)."""
        links = [link for i in instance_ids if (link := self.links.pop(i, None)) is not None]
        for link in links:
            for tally in list(self._tallies.values()):
                tally.on_lost(link.instance_id)
        await asyncio.gather(*(link.stop() for link in links), return_exceptions=True)
        if links:
            self.heap.changed()

    async def drop(self, instance_id: str) -> None:
        """The instance is no longer claimed: its stream ends and is not reopened."""
        link = self.links.pop(instance_id, None)
        if link is not None:
            await link.stop()

    def is_connected(self, instance_id: str) -> bool:
        link = self.links.get(instance_id)
        return link is not None and link.connected

    def last_seen(self, instance_id: str) -> datetime | None:
        link = self.links.get(instance_id)
        if link is None or not link.last_seen:
            return None
        return datetime.fromtimestamp(link.last_seen, UTC)

    # --- channels and credentials ---

    def channel_for(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            creds = None
            if self.config.aiida_tls_ca is not None:
                cert = self.config.aiida_client_cert.read_bytes() if self.config.aiida_client_cert else None
                key = self.config.aiida_client_key.read_bytes() if self.config.aiida_client_key else None
                creds = grpc.ssl_channel_credentials(self.config.aiida_tls_ca.read_bytes(), key, cert)
            channel = self._channels[address] = dial(address, creds, CHANNEL_OPTIONS)
        return channel

    def connect_method_for(self, address: str) -> Any:
        """`AiidaService.Connect` on the address's channel (one multi-callable per channel)."""
        method = self._connect_methods.get(address)
        if method is None:
            method = self.channel_for(address).stream_stream(
                CONNECT_METHOD,
                request_serializer=_identity,
                response_deserializer=aiida_pb2.ConnectResponse.FromString,
            )
            self._connect_methods[address] = method
        return method

    def stream_metadata(self, instance_id: str) -> tuple[tuple[str, str], ...]:
        """The call metadata for an instance: a fresh token and its id.

        Not cached: a stream uses its token once, when it opens (then the link drops grpc's Python
        copy of it), so keeping tokens for reconnects would cost every connected instance a copy
        of its ~450-character token to save a 25 us signature per reconnect or unary call."""
        token, _ = self.issuer.issue(instance_name(instance_id), AUDIENCE_AIIDA, self.config.aiida_token_ttl)
        return (("authorization", f"Bearer {token}"), (INSTANCE_HEADER, instance_id))

    def stub_for(
        self, instance_id: str
    ) -> tuple[aiida_pb2_grpc.AiidaServiceAsyncStub, tuple[tuple[str, str], ...]]:
        """A stub and call metadata for unary calls (configure, revoke) to an instance."""
        link = self.links.get(instance_id)
        if link is None:
            raise KeyError(instance_id)
        return aiida_pb2_grpc.AiidaServiceStub(self.channel_for(link.address)), self.stream_metadata(
            instance_id
        )

    # --- search fan-out ---

    def begin_search(
        self, data_need: energy_pb2.DataNeed, instance_ids: Collection[str] | None = None
    ) -> SearchTally:
        """Queues the query on every claimed instance's stream (or those of `instance_ids` this
        replica holds, in a cluster); replies land in the tally."""
        query_id = secrets.token_hex(8)
        payload = aiida_pb2.ConnectRequest(
            search_query=aiida_pb2.SearchQuery(query_id=query_id, data_need=data_need)
        ).SerializeToString()
        tally = SearchTally(query_id)
        if instance_ids is None:
            targets = self.links
        else:
            targets = {i: link for i in instance_ids if (link := self.links.get(i)) is not None}
        tally.queried = len(targets)
        self._tallies[query_id] = tally
        asked = tally.asked
        for instance_id, link in targets.items():
            if link.send(payload):
                asked.add(instance_id)
            else:
                tally.unreachable += 1
        if not asked:
            tally.close()
        return tally

    def end_search(self, tally: SearchTally) -> int:
        """Stops accepting replies; returns how many asked instances timed out."""
        self._tallies.pop(tally.query_id, None)
        return tally.close()

    # --- callbacks from links ---

    def on_match_reply(self, link: InstanceLink, query_id: str, matched: bool) -> bool:
        tally = self._tallies.get(query_id)
        return tally is not None and tally.on_reply(link.instance_id, matched)

    def on_status(self, link: InstanceLink, status: aiida_pb2.DataAccessStatus) -> None:
        for listener in self.status_listeners:
            _notify(listener, link.instance_id, status)

    async def on_link_up(self, link: InstanceLink) -> None:
        self.connected_count += 1
        self._seen.add(link.instance_id)
        self.heap.changed()
        log_event(log, "aiida_connected", logging.DEBUG, instance=link.instance_id, address=link.address)
        for listener in self.up_listeners:
            _notify(listener, link.instance_id)

    async def on_link_down(self, link: InstanceLink) -> None:
        self.connected_count -= 1
        self._seen.add(link.instance_id)
        self.heap.changed()
        for tally in list(self._tallies.values()):
            tally.on_lost(link.instance_id)
        log_event(log, "aiida_disconnected", logging.DEBUG, instance=link.instance_id)

    # --- housekeeping ---

    async def _flush_last_seen(self) -> None:
        if not self._seen:
            return
        ids, self._seen = list(self._seen), set()
        now = datetime.now(UTC)
        try:
            async with self.sessions.begin() as session:
                for chunk in chunked(ids):
                    await session.execute(
                        update(InstanceRow)
                        .where(InstanceRow.instance_id.in_(chunk))
                        .values(last_seen_time=now)
                    )
        except Exception as exc:  # the in-memory times stay right; the next change is written again
            log_event(log, "last_seen_flush_failed", logging.WARNING, instances=len(ids), error=repr(exc))

    async def _flush_last_seen_forever(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            await self._flush_last_seen()

    async def _ping_forever(self) -> None:
        previous_round = time.time()
        while True:
            await asyncio.sleep(self.config.ping_interval)
            this_round = time.time()
            connected = 0
            for link in list(self.links.values()):
                connected += link.connected
                if link.last_seen >= previous_round:
                    # It answered since the last round (a search, a status, a pong): it is alive and
                    # seen, so it needs no ping. Busy streams thus cost no pings, and the pings of
                    # idle ones do not land on top of the searches.
                    if link.last_seen - link.written >= LAST_SEEN_WRITE_SECONDS:
                        link.written = link.last_seen
                        self._seen.add(link.instance_id)
                elif link.connected:
                    link.ping()
            self.connected_count = connected  # the count repaired, should a path have missed it
            previous_round = this_round


def _everything(instance_id: str) -> bool:
    return True


def _identity(data: bytes) -> bytes:
    return data


def _notify(listener: Callable[..., None], *args: object) -> None:
    """Calls a listener; one that fails is logged and does not break the link that called it."""
    try:
        listener(*args)
    except Exception:
        log.exception("listener_failed")
