"""EDDIE's AIIDA MQTT topics and message fields, shared by the AIIDA (publisher) and the sink (subscriber).

The names are EDDIE's own (its AIIDA `MqttStreamer` and region-connector-aiida
`MqttTopic` / `MqttTopicType`): `aiida/v1/{permission_id}/data/outbound/{schema}`,
`aiida/v1/{permission_id}/status`, `aiida/v1/{permission_id}/command/+`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from eddie_common.cli import split_host_port

TOPIC_PREFIX = "aiida/v1"
RAW_SCHEMA_TOPIC = "smart-meter-p1-raw"  # EDDIE's AiidaSchema.SMART_METER_P1_RAW topic name
DATA_FILTER = f"{TOPIC_PREFIX}/+/data/outbound/+"  # what a sink subscribes to
AUTHORIZATION_PROPERTY = "authorization"  # MQTT 5 user property carrying the sink token
SCHEMES = {"mqtt": False, "mqtts": True}  # scheme -> TLS
QOS_AT_LEAST_ONCE = 1


def data_topic(permission_id: str) -> str:
    return f"{TOPIC_PREFIX}/{permission_id}/data/outbound/{RAW_SCHEMA_TOPIC}"


def status_topic(permission_id: str) -> str:
    return f"{TOPIC_PREFIX}/{permission_id}/status"


def command_filter(permission_id: str) -> str:
    return f"{TOPIC_PREFIX}/{permission_id}/command/+"


def permission_of_data_topic(topic: str) -> str | None:
    """The permission id of an `aiida/v1/{permission_id}/data/outbound/{schema}` topic, else None."""
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:2]) != TOPIC_PREFIX or parts[3:5] != ["data", "outbound"]:
        return None
    return parts[2] or None


@dataclass(frozen=True)
class BrokerAddress:
    """Where an MQTT broker listens, from `mqtt://host:port` or `mqtts://host:port`."""

    host: str
    port: int
    tls: bool

    @property
    def uri(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_uri(uri: str) -> BrokerAddress:
    """Parses `mqtt://host:port` / `mqtts://host:port`; ValueError on anything else."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"expected mqtt://host:port or mqtts://host:port, got {uri!r}")
    host, port = split_host_port(rest)
    if not host or "/" in host:
        raise ValueError(f"expected mqtt://host:port or mqtts://host:port, got {uri!r}")
    return BrokerAddress(host.strip("[]"), port, SCHEMES[scheme])


def check_broker_uri(uri: str) -> None:
    """A flag check (`eddie_common.flags`): ValueError unless `uri` is mqtt://host:port or mqtts://host:port."""
    parse_broker_uri(uri)


def is_broker_uri(uri: str) -> bool:
    try:
        parse_broker_uri(uri)
    except ValueError:
        return False
    return True


def tls_context(address: BrokerAddress, ca_pem: bytes | None) -> ssl.SSLContext | None:
    """The TLS context of an `mqtts://` broker (trusting `ca_pem` if given, else the system's), else None."""
    if not address.tls:
        return None
    return ssl.create_default_context(cadata=ca_pem.decode() if ca_pem else None)


def publish_properties(token: str) -> Properties:
    """MQTT 5 PUBLISH properties carrying the sink token in the `authorization` user property."""
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = [(AUTHORIZATION_PROPERTY, token)]
    return properties


def authorization_of(properties: Properties | None) -> str:
    """The token of a message's `authorization` user property (a `Bearer ` prefix is tolerated), or ""."""
    pairs = getattr(properties, "UserProperty", None) or []
    for key, value in pairs:
        if key == AUTHORIZATION_PROPERTY and isinstance(value, str):
            return value.removeprefix("Bearer ").strip()
    return ""
