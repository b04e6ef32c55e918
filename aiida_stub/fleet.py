"""The fleet simulator: N instances `P-0 … P-(N-1)` in one process, behind one port.

The instances are the same `AiidaInstance`s, servicer and registration as the
single stub; only their number differs. Each keeps its own secret and pairing
code in the one state file, and `fleet.csv` lists the pairing codes so a test
or a demo can claim them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from aiida_stub.profile import Profile
from aiida_stub.state import InstanceRecord, StateStore, write_private

FLEET_CSV = "fleet.csv"


def fleet_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


def fleet_records(store: StateStore, prefix: str, count: int) -> list[InstanceRecord]:
    """The fleet's instance records, created (with fresh secrets and codes) where missing."""
    return [store.ensure_instance(instance_id) for instance_id in fleet_ids(prefix, count)]


def round_robin(profiles: Sequence[Profile], count: int) -> list[Profile]:
    return [profiles[i % len(profiles)] for i in range(count)]


def write_fleet_csv(state_dir: Path, records: Sequence[InstanceRecord]) -> Path:
    """Writes `instance_id,pairing_code` rows (mode 0600: pairing codes are secrets of the owner)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["instance_id", "pairing_code"])
    writer.writerows([r.instance_id, r.pairing_code] for r in records)
    path = state_dir / FLEET_CSV
    write_private(path, out.getvalue())
    return path
