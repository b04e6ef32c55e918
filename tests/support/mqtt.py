"""Mosquitto for the MQTT data-path tests: reachability, a private restartable broker, an observer.

Topics are made unique per run by unique permission ids; `clear_retained`
removes the retained statuses a test leaves on the shared broker.
"""

from __future__ import annotations

import asyncio
import getpass
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

SHARED_BROKER = ("127.0.0.1", 1883)


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unique_permission() -> str:
    return f"mq{secrets.token_hex(8)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateBroker:
    """A mosquitto process of the test's own, with persistence, that can be restarted on its port."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    extra_config: str = ""  # more mosquitto.conf lines, e.g. "log_type all" to see every packet in the log

    @property
    def uri(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.directory / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.directory}/\n"
            f"user {getpass.getuser()}\n"  # run as root, mosquitto would drop to a user who cannot write here
            f"{self.extra_config}\n"
        )
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "mosquitto.log").open("ab"),
        )
        deadline = time.monotonic() + 10
        while not reachable("127.0.0.1", self.port):
            assert self.process.poll() is None, "mosquitto exited; see mosquitto.log"
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)

    @property
    def log(self) -> str:
        return (self.directory / "mosquitto.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.process.wait(10)
        self.process = None


@dataclass
class Observed:
    topic: str
    payload: dict[str, Any]
    retain: bool
    at: float  # time.monotonic() of arrival


@dataclass
class Observer:
    """Records every message on `aiida/v1/{permission}/#` (what an EDDIE region connector would see)."""

    messages: list[Observed] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def data(self) -> list[Observed]:
        return [m for m in self.messages if "/data/outbound/" in m.topic]

    def statuses(self) -> list[str]:
        return [m.payload["status"] for m in self.messages if m.topic.endswith("/status")]


async def clear_retained(host: str, port: int, permission_ids: list[str]) -> None:
    """Removes the retained status messages the test left on the shared broker."""
    async with aiomqtt.Client(host, port) as client:
        for permission_id in permission_ids:
            await client.publish(f"aiida/v1/{permission_id}/status", b"", qos=1, retain=True)
