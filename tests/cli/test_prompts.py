"""People at a terminal: the password asked without echo, and `eddie consent` asking live.

The real `eddie` runs on a pseudo-terminal; the test reads the screen and types.
"""

from __future__ import annotations

import signal
import stat
from pathlib import Path

import pytest

from tests.support.cli import EDDIE, Cast, Person, claim_connected, failure
from tests.support.terminal import Terminal

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def on_terminal(person: Person, *args: str) -> Terminal:
    return Terminal([str(EDDIE), *args], person.env(with_password=False))


@pytest.mark.timeout(300)  # real processes on a shared machine; the first test also starts them
def test_login_asks_the_password_without_echo(cast: Cast) -> None:
    alice = cast.person("alice")
    alice.signup("alice-tty@cli.example", "Alice", "customer")
    alice.ok("logout")
    terminal = on_terminal(alice, "login", "--email", "alice-tty@cli.example")
    terminal.expect("Password: ")
    terminal.type(alice.password + "\n")
    terminal.expect("Signed in as Alice")
    assert terminal.wait() == 0
    assert alice.password not in terminal.screen  # not echoed
    assert stat.S_IMODE(alice.session_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(alice.config_dir.stat().st_mode) == 0o700
    assert alice.password not in alice.session_file.read_text()
    assert alice.json("whoami")["email"] == "alice-tty@cli.example"


# Slow: the no-echo prompt is the login's (test above, same prompt); this adds only the confirmation.
@pytest.mark.slow
def test_signup_asks_the_password_twice_without_echo(cast: Cast) -> None:
    bernd = cast.person("bernd")
    terminal = on_terminal(
        bernd, "signup", "--email", "bernd-tty@cli.example", "--display-name", "Bernd", "--role", "customer"
    )
    terminal.expect("Password: ")
    terminal.type(bernd.password + "\n")
    terminal.expect("Repeat for confirmation: ")
    terminal.type(bernd.password + "\n")
    terminal.expect("Signed up and signed in as Bernd")
    assert terminal.wait() == 0
    assert bernd.password not in terminal.screen


def test_login_without_a_terminal_or_eddie_password_is_refused(cast: Cast) -> None:
    person = cast.person("nobody")
    person.password = ""  # EDDIE_PASSWORD empty counts as unset
    result = person.run("login", "--email", "nobody@cli.example")
    assert result.returncode == 2
    assert "set EDDIE_PASSWORD or run eddie on a terminal" in failure(result)


def _ask_for_access(ep: Person, request_file: Path, instance: str, sink: str) -> None:
    name = ep.json("data-requests", "create", "--file", str(request_file))["name"]
    assert instance in ep.json("search", name, "--timeout", "5")["matchedInstanceIds"]
    ep.json("access", "request", name, "--instance", instance, "--sink-uri", sink)


def _second_request(directory: Path) -> Path:
    text = (EXAMPLES / "data_request.json").read_text()
    path = directory / "second.json"
    path.write_text(text.replace("Austrian household load profiles", "Vienna demand response pilot"))
    return path


@pytest.mark.timeout(300)  # real processes on a shared machine; the first test also starts them
def test_consent_shows_pending_and_new_requests_and_asks_for_each(cast: Cast, tmp_path: Path) -> None:
    ep, alice = cast.person("ep"), cast.person("alice")
    ep.signup("ep-tty@cli.example", "Energy Institute Vienna", "eligible-party")
    alice.signup("alice-consent@cli.example", "Alice", "customer")
    claim_connected(alice, "aiida-alice", cast.aiidas["aiida-alice"])
    sink = f"grpc://{cast.sink.address}"
    _ask_for_access(ep, EXAMPLES / "data_request.json", "aiida-alice", sink)

    terminal = on_terminal(alice, "consent", "--count", "2")
    terminal.expect("Share this data?")
    screen = terminal.screen
    for shown in (
        "Austrian household load profiles",  # title
        "Energy Institute Vienna",  # the EP
        "Grid planning research",  # purpose
        "ELECTRICITY 1-0:1.8.0 every 1m to 15m",  # data asked
        "duration",
        "1h",
    ):
        assert shown in screen, f"{shown!r} not on the consent screen:\n{screen}"
    terminal.type("approve\n")
    terminal.expect(r"is now (ACCEPTED|ACTIVE)")

    _ask_for_access(ep, _second_request(tmp_path), "aiida-alice", sink)  # arrives while consent runs
    terminal.expect("Vienna demand response pilot")
    terminal.expect(r"Vienna demand response pilot[\s\S]*Share this data\?")
    terminal.type("reject\n")
    terminal.expect("is now REJECTED")
    assert terminal.wait() == 0
    states = sorted(p["state"] for p in alice.json("permissions", "list")["permissions"])
    assert states in (["STATE_ACCEPTED", "STATE_REJECTED"], ["STATE_ACTIVE", "STATE_REJECTED"])
    assert "Traceback" not in terminal.screen

    # --count N is N decisions, pending ones included: of two pending requests one is decided, the
    # other stays pending, and the command exits without announcing that it waits for more.
    for _ in range(2):
        _ask_for_access(ep, _second_request(tmp_path), "aiida-alice", sink)
    once = alice.run("consent", "--approve-all", "--count", "1")
    assert once.returncode == 0, once.stderr
    assert once.stdout.count(" is now ") == 1, once.stdout
    assert "2 pending access request(s)" in once.stderr
    assert "waiting for new access requests" not in once.stderr, once.stderr
    states = [p["state"] for p in alice.json("permissions", "list")["permissions"]]
    assert states.count("STATE_PENDING") == 1, states


@pytest.mark.timeout(300)
def test_ctrl_c_at_the_consent_question_ends_at_once_and_decides_nothing(cast: Cast) -> None:
    ep, bernd = cast.person("ep"), cast.person("bernd")
    ep.signup("ep-ctrl-c@cli.example", "Energy Institute Vienna", "eligible-party")
    bernd.signup("bernd-ctrl-c@cli.example", "Bernd", "customer")
    claim_connected(bernd, "aiida-bernd", cast.aiidas["aiida-bernd"])
    _ask_for_access(ep, EXAMPLES / "data_request.json", "aiida-bernd", f"grpc://{cast.sink.address}")

    terminal = on_terminal(bernd, "consent")
    terminal.expect("Share this data?")
    terminal.type("\x03")  # Ctrl-C
    assert terminal.wait(timeout=20) == 130
    assert "interrupted" in terminal.screen and "Traceback" not in terminal.screen
    assert [p["state"] for p in bernd.json("permissions", "list")["permissions"]] == ["STATE_PENDING"]


@pytest.mark.timeout(300)
def test_search_on_a_terminal_shows_answers_against_queried_live(cast: Cast) -> None:
    """The bar counts answers while the search still waits: one AIIDA is frozen (SIGSTOP), so its
    stream stays open but it answers only once the test lets it run again (SIGCONT)."""
    ep = cast.person("ep")
    ep.signup("ep-bar@cli.example", "Energy Institute Vienna", "eligible-party")
    for instance_id, code in cast.aiidas.items():  # both claimed (the tests above may own them already)
        owner = cast.person("owner")
        owner.signup(f"owner-{instance_id}@cli.example", "Owner", "customer")
        claimed = owner.run("instances", "claim", instance_id, "--pairing-code", code)
        if claimed.returncode == 0:
            claim_connected(owner, instance_id, code)
        else:
            assert "ALREADY_EXISTS" in claimed.stderr, claimed.stderr
    name = ep.json("data-requests", "create", "--file", str(EXAMPLES / "data_request.json"))["name"]
    frozen = cast.aiida_procs["aiida-bernd"].popen
    frozen.send_signal(signal.SIGSTOP)
    try:
        terminal = on_terminal(ep, "search", name, "--timeout", "30")
        # Alice has answered (a match), frozen Bernd has not: the bar says so while the search waits.
        terminal.expect(r"searching.*?1/2 answered, 1 matched", timeout=30)
        assert "Matches (" not in terminal.screen
    finally:
        frozen.send_signal(signal.SIGCONT)  # Bernd reads the query and answers: the search ends
    terminal.expect(r"Matches \(2\)")  # Bernd's household fits the request too
    assert terminal.wait() == 0
    assert "2/2 answered, 2 matched" in terminal.screen  # the bar's end: the summary's counts
    assert "Traceback" not in terminal.screen
