"""Delivers one access's readings over MQTT 5 on EDDIE's AIIDA topics (`sink_uri` mqtt:// or mqtts://).

One MQTT session per access: client id and user name = the permission id,
password = the sink token, clean start and session expiry 0, so nothing of it
outlives the access. On every connect the AIIDA subscribes to
`aiida/v1/{permission_id}/command/+` and publishes the retained status `ACTIVE`;
it publishes one JSON record per reading time on
`aiida/v1/{permission_id}/data/outbound/smart-meter-p1-raw` (QoS 1, the token
also in the `authorization` user property); when the access ends it publishes the
retained final status (`REVOKED`, `FULFILLED`, `EXTERNALLY_TERMINATED`) and
disconnects cleanly. A `{"action": "TERMINATE"}` command ends the access as a
termination by the eligible party (reported to the marketplace as STATE_TERMINATED).

Readings wait in the streamer's bounded backlog while the broker is away and
leave it only once the broker acknowledged them (PUBACK); what overflows the
backlog is counted and logged, and reconnection uses the shared backoff. The
generation of readings, the backlog and the retry loop are `AccessStreamer`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Iterator
from typing import Any

import aiomqtt
import grpc
from google.protobuf import timestamp_pb2
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aiida_stub.meter import MeterReading
from aiida_stub.state import StateValue
from aiida_stub.streamer import AccessStreamer, SinkFailed, State, Stopped
from eddie_common.logging import log_event
from eddie_common.mqtt import (
    QOS_AT_LEAST_ONCE,
    command_filter,
    data_topic,
    parse_broker_uri,
    publish_properties,
    status_topic,
    tls_context,
)

log = logging.getLogger(__name__)

# EDDIE's status names (PermissionProcessStatus) for the states an access ends in over MQTT.
STATUS_NAMES: dict[int, str] = {
    State.STATE_ACTIVE: "ACTIVE",
    State.STATE_REVOKED: "REVOKED",
    State.STATE_FULFILLED: "FULFILLED",
    State.STATE_TERMINATED: "EXTERNALLY_TERMINATED",
}
TERMINATE_ACTION = "TERMINATE"
TERMINATE_REASON = "terminated by the eligible party (MQTT TERMINATE command)"
PUBLISH_WINDOW = 10  # records in flight before their acknowledgements are awaited (aiomqtt warns past 10)
CONNECT_TIMEOUT_SECONDS = 5.0
PUBLISH_TIMEOUT_SECONDS = 5.0
FINAL_STATUS_TIMEOUT_SECONDS = 0.5  # within AccessStreamer.stop's budget
DISCONNECT_TIMEOUT_SECONDS = 1.0
KEEPALIVE_SECONDS = 30
_AUTH_REFUSED = frozenset({0x86, 0x87, 4, 5})  # CONNACK: bad user name or password / not authorized


def record_json(permission_id: str, time_us: int, readings: list[MeterReading]) -> bytes:
    """EDDIE's raw record of one reading time.

    `{"timestamp", "permissionId", "values": [{"dataTag", "value", "unitOfMeasurement"}]}`
    """
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(time_us)
    record = {
        "timestamp": ts.ToJsonString(),
        "permissionId": permission_id,
        "values": [{"dataTag": r.tag, "value": r.value, "unitOfMeasurement": r.unit} for r in readings],
    }
    return json.dumps(record, separators=(",", ":")).encode()


def status_json(permission_id: str, status: str) -> bytes:
    """EDDIE's status message `{permissionId, status, timestamp}`."""
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    message = {"permissionId": permission_id, "status": status, "timestamp": ts.ToJsonString()}
    return json.dumps(message).encode()


def is_terminate(payload: bytes, permission_id: str) -> bool:
    """True for `{"action": "TERMINATE", "permissionId": <this permission>}` (permissionId may be omitted)."""
    try:
        command = json.loads(payload)
    except ValueError:
        return False
    return (
        isinstance(command, dict)
        and command.get("action") == TERMINATE_ACTION
        and command.get("permissionId", permission_id) == permission_id
    )


def _session_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0  # the session ends with the connection
    return properties


class _Terminated(Exception):
    """The eligible party sent TERMINATE."""


class MqttAccessStreamer(AccessStreamer):
    """An `AccessStreamer` whose transport is an MQTT 5 session on EDDIE's topics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._address = parse_broker_uri(self.access.sink_uri)
        self._client: aiomqtt.Client | None = None
        self._listener: asyncio.Task[None] | None = None
        self._terminate = asyncio.Event()
        self._final_state: StateValue | None = None
        self._connects = 0

    # -- the access's course -------------------------------------------------------------

    async def _stream(self) -> tuple[StateValue, str]:
        try:
            state, reason = await super()._stream()
        except _Terminated:
            log_event(log, "mqtt_terminate_received", permission=self.access.permission_id)
            state, reason = State.STATE_TERMINATED, TERMINATE_REASON
        self._final_state = state
        return state, reason

    async def _deliver(self) -> None:
        """Publishes what is due (in acknowledged windows), else waits for the next interval."""
        self._raise_if_ended()
        client = self._client or await self._connect(announce=True)
        if self._backlog:
            await self._publish_window(client)
        elif self._next_us < self.access.end_us:
            await self._sleep(self._clock.seconds_until(self.access, self._next_interval_end()))

    def _records(self) -> Iterator[tuple[int, int, bytes]]:
        """(readings, time_us, JSON) of the first PUBLISH_WINDOW reading times of the backlog."""
        pid = self.access.permission_id
        groups = itertools.groupby(self._backlog, key=lambda r: r.time_us)
        for time_us, group in itertools.islice(groups, PUBLISH_WINDOW):
            readings = list(group)
            yield len(readings), time_us, record_json(pid, time_us, readings)

    async def _publish_window(self, client: aiomqtt.Client) -> None:
        records = list(self._records())
        topic, properties = data_topic(self.access.permission_id), publish_properties(self.access.sink_token)
        timeout = PUBLISH_TIMEOUT_SECONDS
        publishes = asyncio.gather(
            *(
                client.publish(topic, payload, qos=QOS_AT_LEAST_ONCE, properties=properties, timeout=timeout)
                for _, _, payload in records
            ),
            return_exceptions=True,
        )
        listener = self._listener
        assert listener is not None
        watched: set[asyncio.Future[Any]] = {publishes, listener}
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if not publishes.done():  # the listener ended: the connection is gone
            publishes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishes
            raise SinkFailed(grpc.StatusCode.UNAVAILABLE, "the connection to the broker was lost")
        acked = acked_readings = 0
        error: BaseException | None = None
        for (count, _, _), result in zip(records, publishes.result(), strict=True):
            if isinstance(result, BaseException):
                error = result
                break
            acked, acked_readings = acked + 1, acked_readings + count
        if acked:
            self._stats.published += acked_readings
            self.access.cursor_us = records[acked - 1][1]
            for _ in range(acked_readings):
                self._backlog.popleft()
            self._failures = self._auth_failures = 0
            self._on_progress()
            self._report_dropped()
        if error is not None:
            raise SinkFailed(grpc.StatusCode.UNAVAILABLE, f"publish failed: {error}")

    # -- the MQTT session ------------------------------------------------------------------

    async def _connect(self, *, announce: bool) -> aiomqtt.Client:
        """Opens the session; with `announce`, subscribes to commands and publishes the ACTIVE status."""
        pid = self.access.permission_id
        client = aiomqtt.Client(
            self._address.host,
            self._address.port,
            identifier=pid,
            username=pid,
            password=self.access.sink_token,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            properties=_session_properties(),
            tls_context=tls_context(self._address, self._channels.sink_ca),
            timeout=CONNECT_TIMEOUT_SECONDS,
            keepalive=KEEPALIVE_SECONDS,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            refused = _reason_value(exc.rc) in _AUTH_REFUSED
            code = grpc.StatusCode.PERMISSION_DENIED if refused else grpc.StatusCode.UNAVAILABLE
            raise SinkFailed(code, f"broker refused the connection: {exc}") from None
        except (aiomqtt.MqttError, OSError) as exc:
            raise SinkFailed(grpc.StatusCode.UNAVAILABLE, f"broker unreachable: {exc}") from None
        self._client = client
        self._listener = asyncio.get_running_loop().create_task(self._listen(client), name=f"mqtt-cmd-{pid}")
        if announce:
            try:
                await client.subscribe(
                    command_filter(pid), qos=QOS_AT_LEAST_ONCE, timeout=PUBLISH_TIMEOUT_SECONDS
                )
                await self._publish_status(client, "ACTIVE")
            except aiomqtt.MqttError as exc:
                raise SinkFailed(grpc.StatusCode.UNAVAILABLE, f"broker session failed: {exc}") from None
        self._connects += 1
        log_event(log, "mqtt_connected", permission=pid, broker=self._address.uri, connects=self._connects)
        return client

    async def _listen(self, client: aiomqtt.Client) -> None:
        """Reads commands until the connection ends (the task then ends with the connection's error)."""
        pid = self.access.permission_id
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if is_terminate(payload, pid):
                self._terminate.set()
            else:
                topic = message.topic.value
                log_event(log, "mqtt_command_ignored", logging.WARNING, permission=pid, topic=topic)

    async def _publish_status(self, client: aiomqtt.Client, status: str) -> None:
        pid = self.access.permission_id
        await client.publish(
            status_topic(pid),
            status_json(pid, status),
            qos=QOS_AT_LEAST_ONCE,
            retain=True,
            properties=publish_properties(self.access.sink_token),
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )

    async def _reset_transport(self) -> None:
        """Ends the session (a DISCONNECT if the connection still stands)."""
        client, self._client = self._client, None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.__aexit__(None, None, None), DISCONNECT_TIMEOUT_SECONDS)

    async def _close_call(self) -> None:
        """The access ended (or the program stops): the final status if it ended, then a clean disconnect."""
        state = self._final_state if self._final_state is not None else self.access.state
        status = STATUS_NAMES.get(state) if state != State.STATE_ACTIVE else None
        if status is not None:
            try:
                await asyncio.wait_for(self._announce_end(status), FINAL_STATUS_TIMEOUT_SECONDS)
            except (TimeoutError, SinkFailed, aiomqtt.MqttError) as exc:
                log_event(
                    log,
                    "mqtt_status_not_sent",
                    logging.WARNING,
                    permission=self.access.permission_id,
                    status=status,
                    error=str(exc),
                )
        await self._reset_transport()

    async def _announce_end(self, status: str) -> None:
        client = self._client or await self._connect(announce=False)
        await self._publish_status(client, status)
        log_event(log, "mqtt_status_sent", permission=self.access.permission_id, status=status)

    # -- waiting ---------------------------------------------------------------------------

    def _raise_if_ended(self) -> None:
        if self._stop.is_set():
            raise Stopped
        if self._terminate.is_set():
            raise _Terminated

    async def _sleep(self, seconds: float) -> None:
        """Sleeps, waking when the streamer is stopped, the EP terminates, or the connection drops."""
        self._raise_if_ended()
        waits: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(self._stop.wait()),
            asyncio.ensure_future(self._terminate.wait()),
        }
        if self._listener is not None:
            waits.add(self._listener)
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                if wait is not self._listener:
                    wait.cancel()
        self._raise_if_ended()
        if self._listener is not None and self._listener.done():
            raise SinkFailed(grpc.StatusCode.UNAVAILABLE, "the connection to the broker was lost")


def _reason_value(rc: Any) -> int:
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else -1
