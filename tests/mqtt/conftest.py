"""Fixtures of the MQTT data-path tests: the shared Mosquitto on 127.0.0.1:1883, or a private one.

Tests skip with a clear reason when no broker answers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.support.mqtt import (
    SHARED_BROKER,
    Observed,
    Observer,
    PrivateBroker,
    clear_retained,
    free_port,
    reachable,
)


@pytest.fixture
def broker() -> str:
    """The shared Mosquitto's URI; skips when it does not answer."""
    if not reachable(*SHARED_BROKER):
        pytest.skip("Mosquitto is not reachable on 127.0.0.1:1883 (the MQTT data-path tests need it)")
    return "mqtt://{}:{}".format(*SHARED_BROKER)


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
