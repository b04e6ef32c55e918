"""The persistent state of one process's instances, as one JSON file in the state dir.

It holds secrets (instance secrets, pairing codes, sink tokens), so the file is
mode 0600 in a 0700 directory, and every write goes to a temporary file that is
then renamed over the old one. Writes are coalesced: a fleet of 10,000
instances registering at once rewrites the file a few times, not 10,000 times.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from google.protobuf import timestamp_pb2

from eddie.aiida.v1 import aiida_pb2
from eddie.energy.v1 import energy_pb2
from eddie_common.logging import log_event

log = logging.getLogger(__name__)

STATE_FILE = "aiida-state.json"
FORMAT_VERSION = 1
PAIRING_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no 0/O, 1/I: easy to read off a label
FLUSH_DELAY_SECONDS = 0.005
State = aiida_pb2.DataAccess.State
StateValue: TypeAlias = aiida_pb2.DataAccess.State.ValueType


class StateError(Exception):
    """The state file cannot be read or written."""


def generate_pairing_code() -> str:
    """Eight characters of an unambiguous alphabet, as `K7MX-3QPA`."""
    chars = "".join(secrets.choice(PAIRING_ALPHABET) for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


def generate_instance_id() -> str:
    return f"aiida-{secrets.token_hex(6)}"


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(micros)
    return ts


@dataclass
class AccessRecord:
    """One data access as the instance holds it (times in POSIX microseconds)."""

    permission_id: str
    state: StateValue
    state_reason: str = ""
    data_need: energy_pb2.DataNeed = field(default_factory=energy_pb2.DataNeed)
    sink_uri: str = ""
    sink_token: str = ""
    start_us: int = 0
    end_us: int = 0
    configured_at_us: int = 0  # wall clock at configuration: the simulated clock's anchor
    cursor_us: int = 0  # simulated time up to which the sink acknowledged readings
    source_index: int = 0  # the profile source that serves the access

    @property
    def terminal(self) -> bool:
        return self.state != State.STATE_ACTIVE

    def to_proto(self) -> aiida_pb2.DataAccess:
        """The access as returned to the marketplace: the sink token is never included."""
        access = aiida_pb2.DataAccess(
            permission_id=self.permission_id,
            sink_uri=self.sink_uri,
            state=self.state,
            state_reason=self.state_reason,
        )
        if self.data_need.ByteSize():
            access.data_need.CopyFrom(self.data_need)
        if self.start_us or self.end_us:
            access.start_time.CopyFrom(_timestamp(self.start_us))
            access.end_time.CopyFrom(_timestamp(self.end_us))
        return access

    def status(self) -> aiida_pb2.DataAccessStatus:
        return aiida_pb2.DataAccessStatus(
            permission_id=self.permission_id,
            state=self.state,
            reason=self.state_reason,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "permission_id": self.permission_id,
            "state": State.Name(self.state),
            "state_reason": self.state_reason,
            "data_need": base64.b64encode(self.data_need.SerializeToString()).decode(),
            "sink_uri": self.sink_uri,
            "sink_token": self.sink_token,
            "start_us": self.start_us,
            "end_us": self.end_us,
            "configured_at_us": self.configured_at_us,
            "cursor_us": self.cursor_us,
            "source_index": self.source_index,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AccessRecord:
        return cls(
            permission_id=raw["permission_id"],
            state=State.Value(raw["state"]),
            state_reason=raw.get("state_reason", ""),
            data_need=energy_pb2.DataNeed.FromString(base64.b64decode(raw.get("data_need", ""))),
            sink_uri=raw.get("sink_uri", ""),
            sink_token=raw.get("sink_token", ""),
            start_us=int(raw.get("start_us", 0)),
            end_us=int(raw.get("end_us", 0)),
            configured_at_us=int(raw.get("configured_at_us", 0)),
            cursor_us=int(raw.get("cursor_us", 0)),
            source_index=int(raw.get("source_index", 0)),
        )


@dataclass
class InstanceRecord:
    """One instance's identity, its marketplace, and its data accesses."""

    instance_id: str
    instance_secret: str
    pairing_code: str
    marketplace_public_key: str = ""
    marketplace_issuer: str = ""
    accesses: dict[str, AccessRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_secret": self.instance_secret,
            "pairing_code": self.pairing_code,
            "marketplace_public_key": self.marketplace_public_key,
            "marketplace_issuer": self.marketplace_issuer,
            "accesses": [a.to_json() for a in self.accesses.values()],
        }

    @classmethod
    def from_json(cls, instance_id: str, raw: dict[str, Any]) -> InstanceRecord:
        accesses = (AccessRecord.from_json(a) for a in raw.get("accesses", []))
        return cls(
            instance_id=instance_id,
            instance_secret=raw["instance_secret"],
            pairing_code=raw["pairing_code"],
            marketplace_public_key=raw.get("marketplace_public_key", ""),
            marketplace_issuer=raw.get("marketplace_issuer", ""),
            accesses={a.permission_id: a for a in accesses},
        )


def write_private(path: Path, text: str) -> None:
    """Writes `text` to `path` atomically (temporary file, fsync, rename), readable by the owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_snapshot(path: Path, snapshot: dict[str, Any]) -> None:
    write_private(path, json.dumps(snapshot, separators=(",", ":")))


class StateStore:
    """The instances of this process, loaded at start and saved on every change."""

    def __init__(
        self, path: Path, instances: dict[str, InstanceRecord], default_instance: str | None
    ) -> None:
        self.path = path
        self.instances = instances
        self.default_instance = default_instance
        self._generation = 0
        self._saved_generation = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, state_dir: Path) -> StateStore:
        """Loads `state_dir/aiida-state.json`, creating the directory (0700) if needed."""
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = state_dir / STATE_FILE
            if not path.exists():
                return cls(path, {}, None)
            raw = json.loads(path.read_text(encoding="utf-8"))
            instances = {i: InstanceRecord.from_json(i, r) for i, r in raw.get("instances", {}).items()}
            return cls(path, instances, raw.get("default_instance"))
        except OSError as exc:
            raise StateError(f"{state_dir}: cannot use the state dir: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{state_dir / STATE_FILE}: unreadable state file ({exc!r})") from None

    def ensure_instance(self, instance_id: str, pairing_code: str | None = None) -> InstanceRecord:
        """The record of `instance_id`, created with a fresh secret; a given pairing code replaces its own."""
        record = self.instances.get(instance_id)
        if record is None:
            record = InstanceRecord(
                instance_id, secrets.token_urlsafe(32), pairing_code or generate_pairing_code()
            )
            self.instances[instance_id] = record
        elif pairing_code:
            record.pairing_code = pairing_code
        return record

    def single_instance(self, instance_id: str | None, pairing_code: str | None) -> InstanceRecord:
        """The one instance of a non-fleet process: the flag's id, else the kept one, else a new one."""
        chosen = instance_id or self.default_instance or generate_instance_id()
        self.default_instance = chosen
        return self.ensure_instance(chosen, pairing_code)

    def snapshot(self) -> dict[str, Any]:
        """The state as fresh JSON-able objects (safe to encode in another thread)."""
        return {
            "version": FORMAT_VERSION,
            "default_instance": self.default_instance,
            "instances": {i: r.to_json() for i, r in self.instances.items()},
        }

    def save_now(self) -> None:
        """Writes the file synchronously (start-up and shutdown)."""
        try:
            _write_snapshot(self.path, self.snapshot())
        except OSError as exc:
            raise StateError(f"{self.path}: cannot write the state file: {exc.strerror or exc}") from None
        self._saved_generation = self._generation

    def mark_dirty(self) -> None:
        """Schedules a write soon; changes made meanwhile share it."""
        self._generation += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def commit(self) -> None:
        """Schedules a write and waits until it is on disk."""
        self.mark_dirty()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._generation, waiter))
        await waiter

    async def _flush_loop(self) -> None:
        while self._saved_generation < self._generation:
            await asyncio.sleep(FLUSH_DELAY_SECONDS)
            generation = self._generation
            snapshot = self.snapshot()
            try:
                await asyncio.to_thread(_write_snapshot, self.path, snapshot)
            except OSError as exc:
                log_event(
                    log, "state_write_failed", logging.ERROR, path=self.path, error=exc.strerror or str(exc)
                )
            self._saved_generation = generation
            done = [w for g, w in self._waiters if g <= generation]
            self._waiters = [(g, w) for g, w in self._waiters if g > generation]
            for waiter in done:
                if not waiter.done():
                    waiter.set_result(None)

    async def close(self) -> None:
        """Finishes pending writes."""
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        if self._saved_generation < self._generation:
            self.save_now()
