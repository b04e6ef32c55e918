"""Mosquitto for the MQTT data-path tests: the shared one on 127.0.0.1:1883, or a private one.

Tests skip with a clear reason when no broker answers. Topics are made unique
per run by unique permission ids.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

SHARED_BROKER = ("127.0.0.1", 1883)


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture
def broker() -> str:
    """The shared Mosquitto's URI; skips when it does not answer."""
    if not reachable(*SHARED_BROKER):
        pytest.skip("Mosquitto is not reachable on 127.0.0.1:1883 (the MQTT data-path tests need it)")
    return "mqtt://{}:{}".format(*SHARED_BROKER)


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

    @property
    def uri(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.directory / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.directory}/\n"
            f"user {getpass.getuser()}\n"  # run as root, mosquitto would drop to a user who cannot write here
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

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.process.wait(10)
        self.process = None


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    if shutil.which("mosquitto") is None:
        pytest.skip("the mosquitto binary is not installed (the broker-restart test runs its own)")
    running = PrivateBroker(tmp_path / "broker", free_port())
    running.directory.mkdir()
    running.start()
    try:
        yield running
    finally:
        running.stop()


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


@pytest.fixture
async def observe(broker: str) -> AsyncIterator[Any]:
    """`await observe(permission_id)` starts an observer of that permission's topics."""
    tasks: list[asyncio.Task[None]] = []
    observed: list[str] = []
    host, port = SHARED_BROKER

    async def start(permission_id: str) -> Observer:
        observed.append(permission_id)
        observer = Observer()
        subscribed = asyncio.Event()

        async def run() -> None:
            async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
                await client.subscribe(f"aiida/v1/{permission_id}/#", qos=1)
                subscribed.set()
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    observer.messages.append(
                        Observed(
                            message.topic.value, json.loads(message.payload), message.retain, time.monotonic()
                        )
                    )
                    observer.arrived.set()

        tasks.append(asyncio.create_task(run()))
        await asyncio.wait_for(subscribed.wait(), 5)
        return observer

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await clear_retained(host, port, observed)


async def clear_retained(host: str, port: int, permission_ids: list[str]) -> None:
    """Removes the retained status messages the test left on the shared broker."""
    async with aiomqtt.Client(host, port) as client:
        for permission_id in permission_ids:
            await client.publish(f"aiida/v1/{permission_id}/status", b"", qos=1, retain=True)
