"""The session between calls, the global options, help and shell completion.

The marketplace here hands out access tokens of 5 s, so every call finds the stored access
token about to expire and refreshes it first; RefreshToken rotates the refresh token.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import click
import jwt
import pytest
from click.testing import CliRunner

from eddie_cli.commands import cli
from eddie_common.tokens import SigningKey, TokenIssuer
from tests.support.cli import EDDIE, Marketplace, Person, failure

pytestmark = pytest.mark.e2e
MARKETPLACE_FLAGS = ("--access-token-ttl", "5")


def _stored(person: Person) -> dict[str, Any]:
    stored: dict[str, Any] = json.loads(person.session_file.read_text())
    return stored


def test_an_expiring_access_token_is_refreshed_and_the_rotated_refresh_token_kept(
    lone_marketplace: Marketplace,
) -> None:
    dana = lone_marketplace.person("dana")
    account = dana.signup("dana@cli.example", "Dana", "customer")
    first = _stored(dana)
    assert set(first) == {
        "marketplace",
        "access_token",
        "refresh_token",
        "expire_time",
        "refresh_expire_time",
        "account",
    }
    assert dana.json("whoami")["name"] == account["name"]
    second = _stored(dana)
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert dana.json("whoami")["name"] == account["name"]  # the rotated refresh token works
    assert _stored(dana)["refresh_token"] != second["refresh_token"]
    assert dana.password not in dana.session_file.read_text()


def test_a_session_whose_refresh_token_was_used_elsewhere_asks_to_sign_in_again(
    lone_marketplace: Marketplace,
) -> None:
    erik = lone_marketplace.person("erik")
    erik.signup("erik@cli.example", "Erik", "customer")
    stale = erik.session_file.read_text()
    erik.ok("whoami")  # rotates the refresh token; the stale copy's one is spent
    erik.session_file.write_text(stale)
    result = erik.run("whoami")
    assert result.returncode == 4
    assert "sign in again" in failure(result)


def test_logout_forgets_the_session(lone_marketplace: Marketplace) -> None:
    fay = lone_marketplace.person("fay")
    fay.signup("fay@cli.example", "Fay", "customer")
    assert fay.json("logout") == {"signedOut": True, "marketplace": lone_marketplace.marketplace.address}
    assert not fay.session_file.exists()
    assert fay.run("whoami").returncode == 4


def test_output_json_before_or_after_the_command_is_the_same_document(lone_marketplace: Marketplace) -> None:
    gus = lone_marketplace.person("gus")
    gus.signup("gus@cli.example", "Gus", "eligible-party")
    before = json.loads(gus.ok("--output", "json", "data-requests", "list"))
    after = json.loads(gus.ok("data-requests", "list", "-o", "json"))
    # No data request yet: the empty ListDataRequestsResponse, its fields printed at their defaults.
    assert before == after == {"dataRequests": [], "nextPageToken": "", "totalSize": 0}
    table = gus.ok("data-requests", "list")
    assert "No data request matches." in table


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(_command_paths(command, (*prefix, name)))
    return paths


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        found = command.get_command(click.Context(command), name)
        assert found is not None
        command = found
    return command


def test_every_command_explains_itself() -> None:
    """The binary's own help, then every command's help in-process (27 processes would be slow)."""
    top = subprocess.run([str(EDDIE), "--help"], capture_output=True, text=True, check=True).stdout
    paths = _command_paths(cli)
    for name in {p[0] for p in paths}:
        assert f"  {name} " in top, f"{name} missing from eddie --help"
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(cli, [*path, "--help"], prog_name="eddie")
        assert result.exit_code == 0, path
        assert "Usage: eddie" in result.output and len(result.output.splitlines()) > 4, path
        if path != ("completion",) and not isinstance(_command(path), click.Group):
            assert "--output" in result.output and "--marketplace" in result.output, f"{path} lacks them"
    names = {p[0] for p in paths}
    assert {"signup", "login", "logout", "whoami", "instances", "data-requests", "search", "access"} <= names
    assert {"consent", "permissions", "activity", "receipts", "completion"} <= names


def test_shell_completion_completes_commands(tmp_path: Any) -> None:
    script = subprocess.run([str(EDDIE), "completion", "bash"], capture_output=True, text=True, check=True)
    assert "_EDDIE_COMPLETE=bash_complete" in script.stdout
    env = {"_EDDIE_COMPLETE": "bash_complete", "COMP_WORDS": "eddie data-requests cl", "COMP_CWORD": "2"}
    completed = subprocess.run([str(EDDIE)], capture_output=True, text=True, env=env, check=True)
    assert "plain,close" in completed.stdout.splitlines()


def test_an_access_token_the_marketplace_calls_expired_is_refreshed_and_the_call_retried(
    lone_marketplace: Marketplace,
) -> None:
    """The stored expiry says fresh, the marketplace says TOKEN_EXPIRED: refresh once, retry."""
    hana = lone_marketplace.person("hana")
    account = hana.signup("hana@cli.example", "Hana", "customer")
    stored = _stored(hana)
    claims = jwt.decode(stored["access_token"], options={"verify_signature": False})
    key = SigningKey.load_or_create(lone_marketplace.work / "mp" / "signing-key.pem")
    extra = {k: v for k, v in claims.items() if k not in ("iss", "sub", "aud", "iat", "nbf", "exp", "jti")}
    expired, _ = TokenIssuer(key, claims["iss"]).issue(claims["sub"], claims["aud"], -120, **extra)
    stored.update(access_token=expired, expire_time="2099-01-01T00:00:00Z")
    hana.session_file.write_text(json.dumps(stored))

    assert hana.json("whoami")["name"] == account["name"]
    after = _stored(hana)
    assert after["access_token"] != expired
    assert after["refresh_token"] != stored["refresh_token"]
