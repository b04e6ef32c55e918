"""Start-up failures of the three programs, run as real processes: one line, the right exit status.

Each bad input must end the program with exit status 2 (the operator's input cannot work) or
1 (a dependency is unavailable), ONE line on stderr naming the problem and the value (never a
password), no traceback, and nothing created: no data dir, no state dir, no database tables.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.support.postgres import POSTGRES_URL, postgres_execute, postgres_reachable

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"marketplace-server": "marketplace_server", "aiida-stub": "aiida_stub", "eddie-sink": "eddie_sink"}
# What each program creates at start-up, relative to the test's tmp_path; none may exist after a failure.
CREATES = {"marketplace-server": "data", "aiida-stub": "state", "eddie-sink": "data"}
BASE_ARGS = {
    "marketplace-server": ["--listen", "127.0.0.1:0", "--data-dir", "{tmp}/data"],
    "aiida-stub": ["--listen", "127.0.0.1:0", "--marketplace", "127.0.0.1:1", "--state-dir", "{tmp}/state"],
    "eddie-sink": ["--listen", "127.0.0.1:0", "--marketplace", "127.0.0.1:1", "--data-dir", "{tmp}/data"],
}
BAD_PROFILE = 'region = "AT-9"\nseed = 1\n'


@dataclass
class Outcome:
    status: int
    stderr: str
    lines: list[str] = field(default_factory=list)


def run_program(program: str, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Outcome:
    argv = [a.replace("{tmp}", str(tmp)) for a in [*BASE_ARGS[program], *args]]
    try:
        result = subprocess.run(
            [sys.executable, "-m", MODULES[program], *argv],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=180,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:  # only this case fails
        return Outcome(-1, f"{program} {argv} did not exit within 180 s")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return Outcome(result.returncode, result.stderr, lines)


def assert_one_line(outcome: Outcome, program: str, status: int, *names: str) -> None:
    assert outcome.status == status, outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert len(outcome.lines) == 1, outcome.stderr
    assert outcome.lines[0].startswith(f"{program}: error: "), outcome.stderr
    for name in names:
        assert name in outcome.lines[0], (name, outcome.stderr)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _tls_cases() -> list[tuple[str, list[str], str]]:
    return [
        (program, [flag, "{tmp}/missing.pem", *rest], f"{flag} {{tmp}}/missing.pem: no such file")
        for program, flag, rest in [
            ("marketplace-server", "--tls-cert", ["--tls-key", "{tmp}/missing.key"]),
            ("marketplace-server", "--aiida-ca", []),
            ("aiida-stub", "--tls-cert", ["--tls-key", "{tmp}/missing.key"]),
            ("aiida-stub", "--marketplace-ca", []),
            ("eddie-sink", "--tls-key", ["--tls-cert", "{tmp}/file"]),
        ]
    ]


# (program, extra args, expected exit status, what the line must name)
USAGE_CASES: list[tuple[str, list[str], int, list[str]]] = [
    *[(p, a, 2, [n]) for p, a, n in _tls_cases()],
    *[
        (p, ["--listen", "999.1.1.1:80"], 2, ["--listen", "999.1.1.1"])
        for p in ("marketplace-server", "aiida-stub", "eddie-sink")
    ],
    ("marketplace-server", ["--tls-cert", "{tmp}", "--tls-key", "{tmp}"], 2, ["--tls-cert {tmp}", "not a"]),
    ("eddie-sink", ["--tls-cert", "{tmp}", "--tls-key", "{tmp}"], 2, ["--tls-cert {tmp}", "not a"]),
    (
        "marketplace-server",
        ["--data-dir", "{tmp}/file/data"],
        2,
        ["--data-dir {tmp}/file/data", "not a directory"],
    ),
    (
        "aiida-stub",
        ["--state-dir", "{tmp}/file/state"],
        2,
        ["--state-dir {tmp}/file/state", "not a directory"],
    ),
    ("eddie-sink", ["--data-dir", "{tmp}/file/data"], 2, ["--data-dir {tmp}/file/data", "not a directory"]),
    ("eddie-sink", ["--jsonl", "{tmp}"], 2, ["--jsonl {tmp}"]),
    ("aiida-stub", ["--profile", "{tmp}/bad.toml"], 2, ["--profile {tmp}/bad.toml", "sources"]),
    ("aiida-stub", ["--profile", "{tmp}/none.toml"], 2, ["{tmp}/none.toml"]),
    ("marketplace-server", ["--grace-period", "-1"], 2, ["--grace-period", "-1"]),
    ("marketplace-server", ["--max-concurrent-rpcs", "many"], 2, ["--max-concurrent-rpcs", "'many'"]),
    ("marketplace-server", ["--search-timeout", "0"], 2, ["--search-timeout", "0"]),
    ("aiida-stub", ["--fleet", "-3"], 2, ["--fleet", "-3"]),
    ("aiida-stub", ["--time-scale", "fast"], 2, ["--time-scale", "'fast'"]),
    ("eddie-sink", ["--grace-period", "soon"], 2, ["--grace-period", "'soon'"]),
    ("marketplace-server", ["--database-url", "mysql://x@h/db"], 2, ["--database-url"]),
    ("eddie-sink", ["--metrics-listen", "999.1.1.1:9"], 2, ["--metrics-listen", "999.1.1.1"]),
    ("aiida-stub", ["--metrics-listen", "nohost"], 2, ["--metrics-listen", "'nohost'"]),
    ("marketplace-server", ["--listen", "1.2.3.4:0"], 2, ["--listen: cannot listen on 1.2.3.4:0"]),
]


Case = tuple[str, list[str], int, list[str]]


def case_id(case: Case) -> str:
    return f"{case[0]}:{' '.join(case[1]).replace('{tmp}', '')}"


# `make test` runs one case of each kind of check, and each program at least twice (each start of a
# process costs seconds of imports); the other cases run the same shared start-up checks
# (eddie_common.startup, eddie_common.flags, whose messages tests/test_flags.py checks in process) in
# another program or with another value, and are `slow` (`make test-all`).
FAST_CASE_IDS = {
    "marketplace-server:--tls-cert /missing.pem --tls-key /missing.key",  # a missing TLS file
    "aiida-stub:--marketplace-ca /missing.pem",
    "eddie-sink:--tls-key /missing.pem --tls-cert /file",
    "aiida-stub:--listen 999.1.1.1:80",  # a bad address
    "marketplace-server:--tls-cert  --tls-key ",  # a directory for a file
    "marketplace-server:--data-dir /file/data",  # a file for a directory
    "aiida-stub:--profile /bad.toml",  # a profile without sources
    "eddie-sink:--grace-period soon",  # not a number
    "marketplace-server:--database-url mysql://x@h/db",  # an unsupported database
    "eddie-sink:--metrics-listen 999.1.1.1:9",
    "marketplace-server:--listen 1.2.3.4:0",  # an address it cannot listen on
}
FAST_CASES = [c for c in USAGE_CASES if case_id(c) in FAST_CASE_IDS]
SLOW_CASES = [c for c in USAGE_CASES if case_id(c) not in FAST_CASE_IDS]
assert len(FAST_CASES) == len(FAST_CASE_IDS), "a fast case id names no case"


def run_cases(tmp_path_factory: pytest.TempPathFactory, cases: list[Case]) -> dict[str, tuple[Path, Outcome]]:
    """Every case run once, several processes at a time (each start costs seconds of imports)."""

    def one(case: Case) -> tuple[Path, Outcome]:
        tmp = tmp_path_factory.mktemp("startup")
        (tmp / "file").write_text("a regular file, not a directory\n")
        (tmp / "bad.toml").write_text(BAD_PROFILE)
        return tmp, run_program(case[0], tmp, *case[1])

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(map(case_id, cases), pool.map(one, cases), strict=True))


@pytest.fixture(scope="module")
def fast_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Outcome]]:
    return run_cases(tmp_path_factory, FAST_CASES)


@pytest.fixture(scope="module")
def slow_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Outcome]]:
    return run_cases(tmp_path_factory, SLOW_CASES)


def check_case(outcomes: dict[str, tuple[Path, Outcome]], case: Case) -> None:
    program, _, status, names = case
    tmp, outcome = outcomes[case_id(case)]
    assert_one_line(outcome, program, status, *(n.replace("{tmp}", str(tmp)) for n in names))
    assert not (tmp / CREATES[program]).exists()


@pytest.mark.timeout(900)  # the first case's setup runs all of them (the module fixture)
@pytest.mark.parametrize("case", FAST_CASES, ids=[case_id(c) for c in FAST_CASES])
def test_bad_input_is_one_line_and_nothing_is_created(
    fast_outcomes: dict[str, tuple[Path, Outcome]], case: Case
) -> None:
    check_case(fast_outcomes, case)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", SLOW_CASES, ids=[case_id(c) for c in SLOW_CASES])
def test_bad_input_in_the_other_programs_and_values(
    slow_outcomes: dict[str, tuple[Path, Outcome]], case: Case
) -> None:
    check_case(slow_outcomes, case)


def test_bad_environment_variable_is_named(tmp_path: Path) -> None:
    outcome = run_program("eddie-sink", tmp_path, env={"EDDIE_SINK_GRACE_PERIOD": "x"})
    assert_one_line(outcome, "eddie-sink", 2, "EDDIE_SINK_GRACE_PERIOD", "'x'")


@pytest.mark.parametrize(
    "program",
    [
        "marketplace-server",
        # The same shared check (eddie_common.startup); aiida-stub's also in process in tests/aiida_stub.
        pytest.param("aiida-stub", marks=pytest.mark.slow),
        pytest.param("eddie-sink", marks=pytest.mark.slow),
    ],
)
def test_port_taken_says_which_port_and_what_to_do(tmp_path: Path, taken_port: int, program: str) -> None:
    outcome = run_program(program, tmp_path, "--listen", f"127.0.0.1:{taken_port}")
    assert_one_line(outcome, program, 2, f"127.0.0.1:{taken_port}", "in use", "HOST:0")
    assert not (tmp_path / CREATES[program]).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of file modes")
def test_unreadable_tls_file_and_unwritable_data_dir(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("secret")
    key.chmod(0)
    outcome = run_program("eddie-sink", tmp_path, "--tls-cert", str(key), "--tls-key", str(key))
    assert_one_line(outcome, "eddie-sink", 2, f"--tls-cert {key}", "cannot read")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    outcome = run_program("marketplace-server", tmp_path, "--data-dir", str(locked / "data"))
    assert_one_line(outcome, "marketplace-server", 2, f"{locked}", "not writable")
    assert not (locked / "data").exists()


def test_metrics_port_taken(tmp_path: Path, taken_port: int) -> None:
    outcome = run_program("marketplace-server", tmp_path, "--metrics-listen", f"127.0.0.1:{taken_port}")
    assert_one_line(
        outcome, "marketplace-server", 2, f"--metrics-listen: cannot listen on 127.0.0.1:{taken_port}"
    )
    assert not (tmp_path / "data").exists()


def test_unreachable_oidc_issuer(tmp_path: Path) -> None:
    issuer = "http://127.0.0.1:1/realms/eddie"
    outcome = run_program("marketplace-server", tmp_path, "--oidc-issuer", issuer, "--oidc-audience", "eddie")
    assert_one_line(outcome, "marketplace-server", 1, f"OpenID Connect issuer {issuer} is unavailable")


def test_debug_log_level_still_shows_the_traceback(tmp_path: Path, taken_port: int) -> None:
    outcome = run_program(
        "marketplace-server", tmp_path, "--listen", f"127.0.0.1:{taken_port}", "--log-level", "debug"
    )
    assert outcome.status == 2
    assert "Traceback" in outcome.stderr
    assert outcome.lines[-1].startswith("marketplace-server: error: --listen")


# -- PostgreSQL: unreachable, missing database, wrong user; TLS checked before any migration --------


@pytest.fixture
def postgres() -> str:
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set TEST_POSTGRES_URL)")
    return POSTGRES_URL


def _with(url: str, **parts: object) -> str:
    return make_url(url).set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


def test_unreachable_postgres(tmp_path: Path) -> None:
    url = "postgresql+asyncpg://postgres:pw-never-shown@127.0.0.1:1/test"
    outcome = run_program("marketplace-server", tmp_path, "--database-url", url)
    assert_one_line(
        outcome, "marketplace-server", 1, "cannot reach PostgreSQL at 127.0.0.1:1", "--database-url"
    )
    assert "pw-never-shown" not in outcome.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.postgres
def test_missing_database(tmp_path: Path, postgres: str) -> None:
    url = _with(postgres, database="does_not_exist_db")
    outcome = run_program("marketplace-server", tmp_path, "--database-url", url)
    assert_one_line(
        outcome, "marketplace-server", 1, "database does_not_exist_db does not exist", "create it"
    )
    assert not (tmp_path / "data").exists()


@pytest.mark.postgres
def test_wrong_credentials_never_show_the_password(tmp_path: Path, postgres: str) -> None:
    url = _with(postgres, username="no_such_user_x", password="s3cret-pw")
    outcome = run_program("marketplace-server", tmp_path, "--database-url", url)
    assert_one_line(outcome, "marketplace-server", 1, "refused user no_such_user_x", "--database-url")
    assert "s3cret-pw" not in outcome.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.postgres
def test_missing_schema(tmp_path: Path, postgres: str) -> None:
    outcome = run_program(
        "marketplace-server", tmp_path, "--database-url", postgres, "--database-schema", "no_such_schema_x"
    )
    assert_one_line(outcome, "marketplace-server", 1, "--database-schema no_such_schema_x")
    assert not (tmp_path / "data").exists()


@pytest.mark.postgres
def test_tls_files_are_checked_before_any_migration(tmp_path: Path, postgres: str) -> None:
    schema = f"t_{os.urandom(8).hex()}"
    asyncio.run(postgres_execute(f"CREATE SCHEMA {schema}"))
    try:
        outcome = run_program(
            "marketplace-server",
            tmp_path,
            *("--database-url", postgres, "--database-schema", schema),
            *("--tls-cert", "{tmp}/missing.pem", "--tls-key", "{tmp}/missing.key"),
        )
        assert_one_line(outcome, "marketplace-server", 2, f"--tls-cert {tmp_path}/missing.pem")
        tables = f"SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}'"
        assert asyncio.run(postgres_execute(tables)) == 0
        assert not (tmp_path / "data").exists()
    finally:
        asyncio.run(postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
