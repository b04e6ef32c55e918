"""The sink's MQTT ingest: EDDIE's AIIDA data topics, stored exactly as `Publish` stores readings.

With `--mqtt-url` the sink subscribes to `aiida/v1/+/data/outbound/+` (QoS 1).
Each message must carry, in its MQTT 5 user property `authorization`, a valid
sink token (marketplace-signed, audience `eddie-sink`, not expired) of the
permission named in its topic; its record
`{"timestamp", "permissionId", "values": [{"dataTag", "value", "unitOfMeasurement"}]}`
becomes one reading per value, validated by `accept_reading` and handed to the
same `ReadingWriter` (same de-duplication, same `ListReadings`). Anything else
is dropped and counted by reason, and logged without the token; a bad message
never stops the subscriber. A lost broker is retried with the shared backoff.

The subscription is a persistent MQTT 5 session (a client id kept in the sink's
database, clean start off, a session expiry of a week by default): while the
sink is away or reconnecting, the broker queues the QoS 1 messages for it.

A message is acknowledged (its QoS 1 PUBACK) only once its readings are
committed, not when it arrives: a sink that crashes in between has not
acknowledged it, and the broker sends it again when the sink's session
reconnects (the store de-duplicates by reading). aiomqtt 2.5.1 has no manual-ack
option, but its paho-mqtt 2.2 client does (`manual_ack_set`, `ack(mid, qos)`);
the acks go out in arrival order (MQTT requires that), each after the group
commit that holds its readings, so acking costs no extra commit. A failed commit
acknowledges nothing more and reconnects, so the broker redelivers. A message
that is dropped (bad token, malformed, permission ended) is acknowledged at once:
it will never be stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
from collections import Counter
from typing import Any

import aiomqtt
from google.protobuf import timestamp_pb2
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2
from eddie_common.errors import DomainError, InvalidArgument
from eddie_common.logging import log_event
from eddie_common.mqtt import (
    DATA_FILTER,
    QOS_AT_LEAST_ONCE,
    BrokerAddress,
    authorization_of,
    permission_of_data_topic,
    tls_context,
)
from eddie_common.retry import Backoff, retry_log_level
from eddie_common.tokens import AUDIENCE_SINK
from eddie_sink.auth import KEYS_WAIT_SECONDS, Publisher, publisher_of
from eddie_sink.ends import PermissionEnds
from eddie_sink.keys import MarketplaceKeys
from eddie_sink.readings import StoredReading, accept_reading
from eddie_sink.store import ReadingStore
from eddie_sink.writer import ReadingWriter

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 256 * 1024
MAX_VALUES = 1_000
DROP_LOG_EVERY = 100  # after the first few, one `mqtt_message_dropped` line per this many drops
KEEPALIVE_SECONDS = 30
CONNECT_TIMEOUT_SECONDS = 5.0
DRAIN_SECONDS = 2.0  # on close: how long to wait for the acks of messages whose readings are being committed

# An acknowledgement due once its readings are committed: (the commits it waits for, message id, QoS).
PendingAck = tuple[list["asyncio.Future[None]"], int, int]


class Dropped(Exception):
    """A message that is not stored; `reason` is what it is counted under."""

    def __init__(self, reason: str, permission_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.permission_id = permission_id


def parse_record(payload: bytes, permission_id: str) -> list[StoredReading]:
    """The readings of one raw record of `permission_id`, validated as `Publish` validates them."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Dropped("PAYLOAD_TOO_LARGE", permission_id)
    try:
        record = json.loads(payload)
    except ValueError:
        raise Dropped("MALFORMED_JSON", permission_id) from None
    if not isinstance(record, dict):
        raise Dropped("MALFORMED_RECORD", permission_id)
    if record.get("permissionId", permission_id) != permission_id:
        raise Dropped("PERMISSION_MISMATCH", permission_id)
    values, stamp = record.get("values"), record.get("timestamp")
    if not isinstance(values, list) or not 0 < len(values) <= MAX_VALUES or not isinstance(stamp, str):
        raise Dropped("MALFORMED_RECORD", permission_id)
    time = timestamp_pb2.Timestamp()
    try:
        time.FromJsonString(stamp)
    except ValueError:
        raise Dropped("INVALID_TIMESTAMP", permission_id) from None
    readings = []
    for value in values:
        reading = _reading(value, permission_id, time)
        try:
            readings.append(accept_reading(data_sink_pb2.PublishRequest(reading=reading), permission_id))
        except InvalidArgument:
            raise Dropped("INVALID_READING", permission_id) from None
    return readings


def _reading(value: Any, permission_id: str, time: timestamp_pb2.Timestamp) -> energy_pb2.Reading:
    """One `{dataTag, value, unitOfMeasurement}` as a Reading (EDDIE sends values as numbers or strings)."""
    if not isinstance(value, dict):
        raise Dropped("MALFORMED_RECORD", permission_id)
    tag, unit, number = value.get("dataTag"), value.get("unitOfMeasurement", ""), value.get("value")
    if isinstance(number, str):
        with contextlib.suppress(ValueError):
            number = float(number)
    if not (isinstance(tag, str) and isinstance(unit, str)) or isinstance(number, bool):
        raise Dropped("MALFORMED_RECORD", permission_id)
    if not isinstance(number, int | float) or not math.isfinite(number):
        raise Dropped("INVALID_READING", permission_id)
    return energy_pb2.Reading(permission_id=permission_id, data_tag=tag, value=number, unit=unit, time=time)


class MqttIngest:
    """Subscribes to the AIIDA data topics of one broker and stores what passes the checks."""

    def __init__(
        self,
        address: BrokerAddress,
        keys: MarketplaceKeys,
        store: ReadingStore,
        writer: ReadingWriter,
        *,
        backoff: Backoff | None = None,
        ca_pem: bytes | None = None,
        client_id: str | None = None,
        session_expiry: int = 7 * 86400,
        ends: PermissionEnds | None = None,
    ) -> None:
        self.address = address
        self._ends = ends
        self._keys = keys
        self._store = store
        self._writer = writer
        self._backoff = backoff or Backoff()
        self._ca_pem = ca_pem
        self._session_expiry = session_expiry
        self._client_id = client_id or f"eddie-sink-{secrets.token_hex(6)}"
        self._known: set[str] = set()  # permissions already recorded in the store
        self.messages = 0  # received
        self.stored = 0  # readings handed to the writer
        self.dropped: Counter[str] = Counter()  # messages not stored, by reason
        self.acknowledged = 0  # PUBACKs sent (after the commit of the message's readings)
        self._closing = asyncio.Event()
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._closing.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mqtt-ingest")

    async def close(self) -> None:
        """Takes no more messages, acknowledges those committed within DRAIN_SECONDS, disconnects.

        Call it while the writer still runs (the sink closes MQTT first): the readings already handed
        over are committed meanwhile and their messages acknowledged; the rest the broker sends again.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._closing.set()
        try:
            if self.connected.is_set():  # else there is nothing to acknowledge: stop at once
                await asyncio.wait_for(asyncio.shield(task), DRAIN_SECONDS + 1.0)
        except TimeoutError:
            pass
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task

    async def _consume(self, client: aiomqtt.Client) -> None:
        """Handles messages and acknowledges each once committed, until closing or the connection breaks."""
        acks: asyncio.Queue[PendingAck | None] = asyncio.Queue()
        receiver = asyncio.create_task(self._receive(client, acks), name="mqtt-receive")
        acker = asyncio.create_task(self._acknowledge(_paho(client), acks), name="mqtt-ack")
        closing = asyncio.create_task(self._closed(), name="mqtt-closing")
        tasks = (receiver, acker, closing)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if closing.done() and not acker.done():
                receiver.cancel()
                acks.put_nowait(None)  # ack what is committed meanwhile, then stop
                await asyncio.wait([acker], timeout=DRAIN_SECONDS)
            for part in (receiver, acker):
                if part.done() and not part.cancelled() and (error := part.exception()) is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _closed(self) -> None:
        await self._closing.wait()

    async def _receive(self, client: aiomqtt.Client, acks: asyncio.Queue[PendingAck | None]) -> None:
        async for message in client.messages:
            commits = await self.handle(message.topic.value, _payload(message), message.properties)
            if message.qos > 0:
                acks.put_nowait((commits, message.mid, message.qos))

    async def _acknowledge(self, paho: Any, acks: asyncio.Queue[PendingAck | None]) -> None:
        """Sends the PUBACKs in arrival order, each once its readings are committed.

        A failed commit stops the acks and breaks the connection (MqttError): the broker sends the
        unacknowledged messages again when the session reconnects.
        """
        while (pending := await acks.get()) is not None:
            commits, mid, qos = pending
            if commits:
                # asyncio.wait, not gather: cancelling this task must not cancel the writer's futures.
                await asyncio.wait(commits)
                for commit in commits:
                    if (error := commit.exception()) is not None:
                        why = type(error).__name__
                        raise aiomqtt.MqttError(
                            f"readings not committed ({why}); the broker will send them again"
                        )
            paho.ack(mid, qos)
            self.acknowledged += 1

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                client = self._client()
                async with client:
                    await client.subscribe(DATA_FILTER, qos=QOS_AT_LEAST_ONCE)
                    failures = 0
                    self.connected.set()
                    log_event(log, "mqtt_subscribed", broker=self.address.uri, topic=DATA_FILTER)
                    await self._consume(client)
                    return  # closing
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                failures += 1
                delay = self._backoff.delay(failures)
                log_event(
                    log,
                    "mqtt_retry",
                    retry_log_level(failures),
                    broker=self.address.uri,
                    error=str(exc),
                    attempt=failures,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)

    def _client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=_session_properties(self._session_expiry),
            tls_context=tls_context(self.address, self._ca_pem),
            timeout=CONNECT_TIMEOUT_SECONDS,
            keepalive=KEEPALIVE_SECONDS,
        )
        # Before connecting: a resumed session's queued messages arrive right after CONNACK.
        _paho(client).manual_ack_set(True)
        return client

    async def handle(self, topic: str, payload: bytes, properties: Any) -> list[asyncio.Future[None]]:
        """Checks and stores one message; never raises for a bad message.

        Returns the commits its readings wait for (none for a dropped message): the message may be
        acknowledged once they have succeeded.
        """
        self.messages += 1
        try:
            permission_id = permission_of_data_topic(topic)
            if permission_id is None:
                raise Dropped("UNKNOWN_TOPIC")
            publisher = await self._authenticate(authorization_of(properties), permission_id)
            readings = parse_record(payload, permission_id)
            return await self.ingest(publisher, readings)
        except Dropped as dropped:
            self._drop(dropped.reason, dropped.permission_id, topic)
        except Exception:
            log.exception("mqtt_message_failed", extra={"topic": topic})
            self._drop("INTERNAL", "", topic)
        return []

    async def _authenticate(self, token: str, permission_id: str) -> Publisher:
        """The publisher of `token`, which must be a valid sink token of `permission_id`."""
        if not token:
            raise Dropped("TOKEN_MISSING", permission_id)
        if not self._keys.ready:
            await self._keys.wait_ready(KEYS_WAIT_SECONDS)
        try:
            publisher = publisher_of(await self._keys.verify(token, AUDIENCE_SINK), token)
        except DomainError as exc:
            raise Dropped(exc.reason, permission_id) from None
        if publisher.permission_id != permission_id:
            raise Dropped("TOKEN_OF_ANOTHER_PERMISSION", permission_id)
        return publisher

    async def ingest(self, publisher: Publisher, readings: list[StoredReading]) -> list[asyncio.Future[None]]:
        """Stores the readings of one authenticated message: the single entry of MQTT data into the store.

        Every reading that reaches the store over MQTT passes here (as Publish's
        readings pass DataSinkServicer.Publish); a "permission ended" gate belongs
        at the top of this function.
        """
        if self._ends is not None:  # the sink honours every end (eddie_sink.ends), as Publish does
            await self._ends.follow(publisher)
            try:
                self._ends.ensure_live(publisher.permission_id)
            except DomainError as exc:
                raise Dropped(exc.reason, publisher.permission_id) from None
        if publisher.permission_id not in self._known:
            await self._store.record_permission(
                publisher.permission_id, publisher.eligible_party, publisher.instance_id
            )
            self._known.add(publisher.permission_id)
        commits: list[asyncio.Future[None]] = []
        for reading in readings:
            committed = await self._writer.submit(reading)
            if not commits or commits[-1] is not committed:
                commits.append(committed)
        self.stored += len(readings)
        return commits

    def _drop(self, reason: str, permission_id: str, topic: str) -> None:
        self.dropped[reason] += 1
        dropped = self.dropped.total()
        level = logging.WARNING if dropped <= 3 or dropped % DROP_LOG_EVERY == 0 else logging.DEBUG
        log_event(
            log,
            "mqtt_message_dropped",
            level,
            permission=permission_id,
            topic=topic,
            why=reason,
            dropped_total=dropped,
        )


def _paho(client: aiomqtt.Client) -> Any:
    """aiomqtt's underlying paho-mqtt client (aiomqtt 2.5.1 exposes no manual-ack option of its own)."""
    return client._client


def _session_properties(expiry: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = expiry
    return properties


def _payload(message: aiomqtt.Message) -> bytes:
    payload = message.payload
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode() if payload is not None else b""
