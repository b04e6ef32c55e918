"""The six workflows through the real `eddie` binary with `--output json`, against live processes.

An eligible party publishes, searches and asks for access; Alice approves and Bernd rejects
on `eddie consent`; the EP's `eddie access watch` sees both outcomes; readings reach the
sink; Alice revokes; a second request is approved and then terminated by the EP; the closed
data request can no longer be searched.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from eddie_client.client import list_readings
from tests.support.cli import Cast, Person, eventually_json, failure
from tests.support.expect import eventually

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _data_service_file(directory: Path) -> Path:
    document = json.loads((EXAMPLES / "data_request.json").read_text())
    document.update(kind="KIND_DATA_SERVICE", title="Heat-pump optimiser", purpose="Optimise heat pumps")
    document["dataNeed"]["regions"] = ["DE"]
    path = directory / "data_service.json"
    path.write_text(json.dumps(document))
    return path


def _states(document: dict[str, Any]) -> dict[str, str]:
    return {p["instanceId"]: p["state"] for p in document.get("permissions", [])}


def _accounts(cast: Cast) -> tuple[Person, Person, Person]:
    ep, alice, bernd = cast.person("ep"), cast.person("alice"), cast.person("bernd")
    account = ep.signup("research@cli.example", "Energy Institute Vienna", "eligible-party")
    assert account["role"] == "ROLE_ELIGIBLE_PARTY"
    assert alice.signup("alice@cli.example", "Alice", "customer")["role"] == "ROLE_CUSTOMER"
    bernd.signup("bernd@cli.example", "Bernd", "customer")
    assert ep.json("whoami")["name"] == account["name"]
    return ep, alice, bernd


def _claim(alice: Person, bernd: Person) -> None:
    assert alice.claim("aiida-alice", "ALICE-2026")["state"] == "STATE_CLAIMED"
    bernd.claim("aiida-bernd", "BERND-2026")
    for who, instance in ((alice, "aiida-alice"), (bernd, "aiida-bernd")):
        listed = eventually_json(who, ("instances", "list"), lambda d: d["instances"][0].get("connected"))
        assert [i["instanceId"] for i in listed["instances"]] == [instance]


def _publish_and_browse(ep: Person, alice: Person, work: Path) -> str:
    request = ep.json("data-requests", "create", "--file", str(EXAMPLES / "data_request.json"))
    assert request["state"] == "STATE_OPEN" and request["name"].startswith("dataRequests/")
    service = ep.json("data-requests", "create", "--file", str(_data_service_file(work)))
    assert service["kind"] == "KIND_DATA_SERVICE"
    in_austria = alice.json("data-requests", "list", "--region", "AT-9")
    assert [r["title"] for r in in_austria["dataRequests"]] == ["Austrian household load profiles"]
    by_text = alice.json("data-requests", "list", "--text", "heat-pump")
    assert [r["name"] for r in by_text["dataRequests"]] == [service["name"]]
    assert alice.json("data-requests", "show", request["name"].removeprefix("dataRequests/")) == request
    first = alice.json("data-requests", "list", "--limit", "1")  # one page of one, and the total
    assert len(first["dataRequests"]) == 1 and first["totalSize"] >= 2
    return str(request["name"])


def _search(ep: Person, name: str) -> None:
    found = ep.json("search", name, "--timeout", "5")
    assert sorted(found["matchedInstanceIds"]) == ["aiida-alice", "aiida-bernd"]
    summary = found["summary"]
    assert summary["queried"] == 2 and summary["matched"] == 2
    assert summary["withheld"] is False and summary["notMatched"] == 0  # defaults printed, not left out
    assert found["name"] == summary["search"]


def _watch_lines(watch: subprocess.Popen[str]) -> list[dict[str, Any]]:
    watch.terminate()
    out, _ = watch.communicate(timeout=30)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _access(cast: Cast, ep: Person, alice: Person, bernd: Person, name: str) -> str:
    watch = ep.popen("access", "watch", name, "--output", "json")
    sink = f"grpc://{cast.sink.address}"
    asked = ep.json(
        "access",
        "request",
        name,
        "--instance",
        "aiida-alice",
        "--instance",
        "aiida-bernd",
        "--sink-uri",
        sink,
    )
    assert _states(asked) == {"aiida-alice": "STATE_PENDING", "aiida-bernd": "STATE_PENDING"}
    [approved] = alice.json_lines("consent", "--approve-all", "--pending-only")
    assert approved["permissionUpdate"]["instanceId"] == "aiida-alice"
    assert approved["permissionUpdate"]["state"] in ("STATE_ACCEPTED", "STATE_ACTIVE")
    [rejected] = bernd.json_lines("consent", "--reject-all", "--pending-only", "--reason", "not for research")
    assert rejected["permissionUpdate"]["state"] == "STATE_REJECTED"
    settled = eventually_json(
        ep,
        ("access", "list", name),
        lambda d: _states(d) == {"aiida-alice": "STATE_ACTIVE", "aiida-bernd": "STATE_REJECTED"},
    )
    # A person's `access watch` opens with each permission's current state (no transition yet): it
    # reads as that state, not as a move from an unspecified one.
    opening = ep.ok("access", "watch", name, "--count", "2").splitlines()
    assert len(opening) == 2 and not any("UNSPECIFIED" in line for line in opening), opening
    assert {"aiida-alice", "aiida-bernd"} == {line.split()[2] for line in opening}, opening
    events = _watch_lines(watch)
    seen = {(e["permission"]["instanceId"], e["permission"]["state"]) for e in events}
    assert {("aiida-alice", "STATE_ACTIVE"), ("aiida-bernd", "STATE_REJECTED")} <= seen
    alice_permission = next(p["name"] for p in settled["permissions"] if p["instanceId"] == "aiida-alice")
    assert [p["state"] for p in alice.json("permissions", "list")["permissions"]] == ["STATE_ACTIVE"]
    return str(alice_permission)


async def _readings_arrive(cast: Cast, ep: Person, permission: str) -> None:
    token = json.loads(ep.session_file.read_text())["access_token"]
    permission_id = permission.removeprefix("permissions/")

    async def some() -> bool:
        return len(await list_readings(cast.sink.address, permission_id, token)) >= 2

    await eventually(some, timeout=30)


def _revoke_terminate_close(
    ep: Person, alice: Person, bernd: Person, name: str, permission: str, sink: str
) -> None:
    revoked = alice.json("permissions", "revoke", permission, "--reason", "study long enough")
    assert revoked["state"] == "STATE_REVOKED"
    eventually_json(
        ep, ("access", "list", name, "--state", "revoked"), lambda d: len(d.get("permissions", [])) == 1
    )
    again = ep.json("access", "request", name, "--instance", "aiida-bernd", "--sink-uri", sink)
    [second] = again["permissions"]
    [answer] = bernd.json_lines("consent", "--approve-all", "--pending-only")
    assert answer["permissionUpdate"]["name"] == second["name"]
    eventually_json(
        ep, ("access", "list", name, "--state", "active"), lambda d: len(d.get("permissions", [])) == 1
    )
    assert ep.json("access", "terminate", second["name"])["state"] == "STATE_TERMINATED"
    closed = ep.json("data-requests", "close", name)
    assert closed["state"] == "STATE_CLOSED"
    line = failure(ep.run("search", name))
    assert "FAILED_PRECONDITION (DATA_REQUEST_CLOSED)" in line


@pytest.mark.timeout(300)  # real processes on a shared machine; the first test also starts them
async def test_the_six_workflows_through_the_cli(cast: Cast, tmp_path: Path) -> None:
    ep, alice, bernd = _accounts(cast)
    _claim(alice, bernd)
    name = _publish_and_browse(ep, alice, tmp_path)
    _search(ep, name)
    permission = _access(cast, ep, alice, bernd, name)
    await _readings_arrive(cast, ep, permission)
    _revoke_terminate_close(ep, alice, bernd, name, permission, f"grpc://{cast.sink.address}")
    _trust(alice, permission)


def _trust(alice: Person, permission: str) -> None:
    """Alice's activity feed and her consent receipts (approve, then revoke) verified offline."""
    feed = alice.json("activity", "aiida-alice")["activities"]
    kinds = {a["kind"] for a in feed}
    assert {"KIND_SEARCH", "KIND_ACCESS_REQUESTED", "KIND_ACCESS_APPROVED"} <= kinds, kinds
    chain = alice.json("receipts", "list")["consentReceipts"]
    assert [(r["permission"], r["sequence"]) for r in chain] == [(permission, "1"), (permission, "2")]
    assert alice.json("receipts", "verify") == {"verified": True, "receipts": 2, "problems": []}
