"""The `eddie` CLI tests' support: live servers as real processes, and the real `eddie` console
script run as one person (their own config dir and password)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eddie_client import procs

EDDIE = Path(sys.executable).parent / "eddie"
PASSWORD = "command line passphrase"
RUN_TIMEOUT = 60.0


@dataclass
class Person:
    """One user of the CLI: XDG_CONFIG_HOME of their own, so sessions never mix."""

    home: Path
    marketplace: str
    password: str = PASSWORD
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.home / "eddie"

    @property
    def session_file(self) -> Path:
        return self.config_dir / "session.json"

    def env(self, with_password: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDDIE_")}
        env.update(XDG_CONFIG_HOME=str(self.home), EDDIE_MARKETPLACE=self.marketplace, COLUMNS="200")
        if with_password:
            env["EDDIE_PASSWORD"] = self.password
        env.update(self.extra_env)
        return env

    def run(
        self, *args: str, timeout: float = RUN_TIMEOUT, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """`eddie ARGS`, stdin closed (not a terminal), output captured."""
        return subprocess.run(
            [str(EDDIE), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
            **kwargs,
        )

    def ok(self, *args: str) -> str:
        """`eddie ARGS` must succeed; its stdout."""
        result = self.run(*args)
        assert result.returncode == 0, f"eddie {' '.join(args)} -> {result.returncode}: {result.stderr}"
        assert "Traceback" not in result.stderr
        return result.stdout

    def json(self, *args: str) -> Any:
        """`eddie ARGS --output json` must succeed and print exactly one JSON document."""
        return json.loads(self.ok(*args, "--output", "json"))

    def json_lines(self, *args: str) -> list[Any]:
        return [json.loads(line) for line in self.ok(*args, "--output", "json").splitlines() if line.strip()]

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """`eddie ARGS` in the background, stdout piped."""
        return subprocess.Popen(
            [str(EDDIE), *args],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def signup(self, email: str, display_name: str, role: str) -> dict[str, Any]:
        account: dict[str, Any] = self.json(
            "signup", "--email", email, "--display-name", display_name, "--role", role
        )
        return account

    def claim(self, instance_id: str, code: str, wait: float = 30.0) -> dict[str, Any]:
        """Claims an AIIDA, retrying while it has not registered itself yet (NOT_FOUND)."""
        deadline = time.monotonic() + wait
        while True:
            result = self.run("instances", "claim", instance_id, "--pairing-code", code, "--output", "json")
            if result.returncode == 0:
                claimed: dict[str, Any] = json.loads(result.stdout)
                return claimed
            assert "NOT_FOUND" in result.stderr, result.stderr
            assert time.monotonic() < deadline, f"{instance_id} never registered: {result.stderr}"
            time.sleep(0.3)


def claim_connected(person: Person, instance_id: str, code: str) -> None:
    """Claims an AIIDA and waits until the marketplace holds its stream (searches reach it)."""
    person.claim(instance_id, code)

    def connected(document: Any) -> bool:
        return any(i["instanceId"] == instance_id and i.get("connected") for i in document["instances"])

    eventually_json(person, ("instances", "list"), connected)


def failure(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a failed command (asserting it is one line and no traceback)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def eventually_json(person: Person, args: tuple[str, ...], check: Any, timeout: float = 30.0) -> Any:
    """Repeats `eddie ARGS --output json` until `check(document)` is true."""
    deadline = time.monotonic() + timeout
    while True:
        document = person.json(*args)
        if check(document):
            return document
        assert time.monotonic() < deadline, f"eddie {' '.join(args)} never satisfied the check: {document}"
        time.sleep(0.3)


PROFILES = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles"
_people = itertools.count()


@dataclass
class Marketplace:
    marketplace: procs.Proc
    work: Path

    def person(self, name: str) -> Person:
        """A new CLI user with a config dir of their own."""
        return Person(self.work / f"home-{name}-{next(_people)}", self.marketplace.address)


@dataclass
class Cast(Marketplace):
    sink: procs.Proc
    aiidas: dict[str, str]  # instance id -> pairing code
    aiida_procs: dict[str, procs.Proc] = field(default_factory=dict)  # instance id -> its process


def start_cast(work: Path, *marketplace_flags: str) -> tuple[Cast, list[procs.Proc]]:
    started: list[procs.Proc] = []
    try:
        mp = procs.start_marketplace(work / "mp", work, *marketplace_flags)
        started.append(mp)
        people = [("alice", "vienna-p1.toml"), ("bernd", "graz-gas.toml")]

        def aiida(who: str, profile: str) -> procs.Proc:
            flags = ("--instance-id", f"aiida-{who}", "--pairing-code", f"{who.upper()}-2026")
            flags += ("--time-scale", "60")
            profile_path = PROFILES / profile
            return procs.start_aiida(mp.address, work / who, profile_path, work, *flags, name=f"aiida-{who}")

        # The sink and the AIIDAs need only the marketplace: they start together.
        sink, *aiida_list = procs.start_all(
            [
                lambda: procs.start_sink(mp.address, work / "sink", work, name="sink"),
                *(lambda who=who, profile=profile: aiida(who, profile) for who, profile in people),
            ]
        )
        started += [sink, *aiida_list]
        aiidas = {f"aiida-{who}": f"{who.upper()}-2026" for who, _ in people}
        aiida_procs = {f"aiida-{who}": p for (who, _), p in zip(people, aiida_list, strict=True)}
        return Cast(mp, work, sink, aiidas, aiida_procs), started
    except BaseException:
        procs.stop_all(started)
        raise
