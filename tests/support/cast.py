"""Real processes for end-to-end tests: a marketplace, an EP sink and two AIIDAs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eddie_client import procs

PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"


@dataclass
class Cast:
    marketplace: procs.Proc
    sink: procs.Proc
    aiidas: dict[str, tuple[procs.Proc, str]]  # who -> (process, pairing code); instance id aiida-<who>
