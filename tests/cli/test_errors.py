"""What goes wrong, said in one line on stderr with a meaningful exit status, never a traceback.

Exit statuses: 1 the marketplace refused, 2 bad usage, 3 marketplace unreachable, 4 not signed in.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import Marketplace, Person, failure

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def ep(lone_marketplace: Marketplace) -> Person:
    person = lone_marketplace.person("ep")
    person.signup("ep-errors@cli.example", "Errors Inc", "eligible-party")
    return person


@pytest.fixture(scope="module")
def customer(lone_marketplace: Marketplace) -> Person:
    person = lone_marketplace.person("customer")
    person.signup("customer-errors@cli.example", "Carla", "customer")
    return person


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unknown_data_request_is_not_found(customer: Person) -> None:
    result = customer.run("data-requests", "show", "dataRequests/no-such-request")
    assert result.returncode == 1
    assert "NOT_FOUND (DATA_REQUEST_NOT_FOUND)" in failure(result)


def test_a_customer_cannot_search(customer: Person, ep: Person) -> None:
    name = ep.json("data-requests", "create", "--file", str(EXAMPLES / "data_request.json"))["name"]
    result = customer.run("search", name)
    assert result.returncode == 1
    assert "PERMISSION_DENIED (ROLE_NOT_ALLOWED)" in failure(result)


def test_an_eligible_party_cannot_claim_an_instance(ep: Person) -> None:
    result = ep.run("instances", "claim", "aiida-x", "--pairing-code", "ABCDEF-1")
    assert result.returncode == 1
    assert failure(result).startswith("error: PERMISSION_DENIED")


def test_a_wrong_password_is_unauthenticated(lone_marketplace: Marketplace, customer: Person) -> None:
    stranger = lone_marketplace.person("stranger")
    stranger.password = "not the right password"
    result = stranger.run("login", "--email", "customer-errors@cli.example")
    assert result.returncode == 4
    line = failure(result)
    assert line.startswith("error: UNAUTHENTICATED (INVALID_CREDENTIALS)")
    assert "sign in again" not in line, "the person just tried to sign in: the hint sends them in a circle"


def test_a_refused_marketplace_is_said_at_once(lone_marketplace: Marketplace) -> None:
    person = lone_marketplace.person("lost")
    port = _closed_port()
    result = person.run("--marketplace", f"127.0.0.1:{port}", "login", "--email", "x@cli.example", timeout=20)
    assert result.returncode == 3
    assert f"cannot reach the marketplace at 127.0.0.1:{port}" in failure(result)


def test_a_silent_marketplace_is_said_within_seconds(lone_marketplace: Marketplace, silent_port: int) -> None:
    person = lone_marketplace.person("lost")
    result = person.run("whoami", "--marketplace", f"127.0.0.1:{silent_port}", timeout=20)
    assert result.returncode == 3
    assert "no answer within 5 s" in failure(result)


def test_commands_need_a_session(lone_marketplace: Marketplace) -> None:
    result = lone_marketplace.person("new").run("instances", "list")
    assert result.returncode == 4
    assert "not signed in" in failure(result)


def test_a_file_that_is_not_a_data_request_is_bad_usage(ep: Person, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"title": "x", "no_such_field": 1}))
    result = ep.run("data-requests", "create", "--file", str(bad))
    assert result.returncode == 2
    assert "is not a DataRequest in protobuf JSON" in failure(result)


def test_an_invalid_data_request_names_the_field(ep: Person, tmp_path: Path) -> None:
    document = json.loads((EXAMPLES / "data_request.json").read_text())
    document["title"] = ""
    path = tmp_path / "untitled.json"
    path.write_text(json.dumps(document))
    line = failure(ep.run("data-requests", "create", "--file", str(path)))
    assert line.startswith("error: INVALID_ARGUMENT") and "title" in line


def test_consent_in_a_script_needs_approve_all_or_reject_all(customer: Person) -> None:
    result = customer.run("consent")
    assert result.returncode == 2
    assert "--approve-all or --reject-all" in failure(result)


def test_activity_of_an_unknown_instance_is_one_line(customer: Person) -> None:
    result = customer.run("activity", "aiida-nobody-owns")
    assert result.returncode == 1
    failure(result)


def test_receipts_verify_passes_or_says_in_one_line_what_failed(customer: Person) -> None:
    """Until the trust features are merged the RPCs or the verifier are missing: one clean line."""
    result = customer.run("receipts", "verify", "--output", "json")
    if result.returncode == 0:
        assert json.loads(result.stdout) == {"verified": True, "receipts": 0, "problems": []}
    else:
        assert result.returncode == 1
        failure(result)
