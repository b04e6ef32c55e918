"""The client examples in `examples/`, run as a user would run them, against live processes.

Two customers claim their AIIDAs with `customer_app.py`; the eligible party publishes,
searches and asks for access with `eligible_party.py`; the customers browse with a
region filter and answer on their consent streams (one approves, one rejects); the EP's
watch sees ACTIVE and REJECTED and exits.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from eddie_client.client import MarketplaceClient
from tests.support.cast import Cast

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "examples passphrase"


@dataclass
class Script:
    """An example script running as a child process, its output collected line by line."""

    name: str
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, script: str, *args: str) -> Script:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / script),
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        me = cls(script, process)
        me._reader = asyncio.create_task(me._read())
        return me

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    async def finish(self, timeout: float = 30.0) -> str:
        """Waits for a zero exit and returns the whole output."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(f"{self.name} did not finish: {self.lines}") from None
        assert self._reader is not None
        await self._reader
        output = "\n".join(self.lines)
        assert code == 0, f"{self.name} exited {code}:\n{output}"
        return output

    async def wait_for(self, text: str, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                if self.process.returncode is not None:
                    raise AssertionError(f"{self.name} exited before printing {text!r}: {self.lines}")
                await asyncio.sleep(0.05)


def customer_args(cast: Cast, who: str) -> list[str]:
    email = f"{who}@examples.test"
    return ["--marketplace", cast.marketplace.address, "--email", email, "--password", PASSWORD]


@pytest.mark.parametrize("script", ["customer_app.py", "eligible_party.py"])
def test_example_explains_its_flags(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "--marketplace" in result.stdout and "--password" in result.stdout


async def test_examples_drive_claim_search_consent_and_watch(cast: Cast) -> None:
    # Customers claim their AIIDAs (the AIIDAs may still be registering: the example waits).
    for who, (_, code) in cast.aiidas.items():
        claim = await Script.start(
            "customer_app.py",
            *customer_args(cast, who),
            "--name",
            who.title(),
            "--instance-id",
            f"aiida-{who}",
            "--pairing-code",
            code,
            "--max",
            "0",
        )
        assert f"claimed instances/aiida-{who}" in await claim.finish()

    # The marketplace connects to the claimed AIIDAs in the background; the EP's search needs them.
    async with MarketplaceClient(cast.marketplace.address) as mp:
        for who in cast.aiidas:
            session = await mp.log_in(f"{who}@examples.test", PASSWORD)
            async with asyncio.timeout(20):
                while not all(i.connected for i in await session.list_instances()):
                    await asyncio.sleep(0.05)

    ep = await Script.start(
        "eligible_party.py",
        "--marketplace",
        cast.marketplace.address,
        "--email",
        "ep@examples.test",
        "--password",
        PASSWORD,
        "--title",
        "Example load study",
        "--region",
        "AT",
        "--duration",
        "600",
        "--sink",
        f"grpc://{cast.sink.address}",
    )
    await ep.wait_for("asked aiida-bernd")

    alice = await Script.start("customer_app.py", *customer_args(cast, "alice"), "--region", "AT-9")
    bernd = await Script.start("customer_app.py", *customer_args(cast, "bernd"), "--reject")
    alice_out, bernd_out = await asyncio.gather(alice.finish(), bernd.finish())
    ep_out = await ep.finish()

    assert "search: 2 of 2 match ['aiida-alice', 'aiida-bernd']" in ep_out
    assert "(aiida-alice): STATE_ACTIVE" in ep_out
    assert "(aiida-bernd): STATE_REJECTED" in ep_out
    # Alice browsed with AT-9 and found the EP's request for AT.
    assert "1 open data requests for region AT-9:" in alice_out
    assert "Example load study by" in alice_out
    assert "'Example load study' by" in alice_out  # the consent screen
    assert "is now STATE_ACCEPTED" in alice_out
    assert "is now STATE_REJECTED" in bernd_out
