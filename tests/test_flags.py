"""One declaration per option drives the parser, the environment variable, the config and the docs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from aiida_stub.config import PROGRAM as AIIDA
from eddie_common.flags import LOG_LEVELS, Program, at_least, flag, host_port, positive
from eddie_common.serving import TlsFiles
from eddie_sink.config import PROGRAM as SINK
from marketplace_server.config import PROGRAM as MARKETPLACE
from marketplace_server.config import Config, parse_config


@dataclass(frozen=True)
class Example:
    target: str = flag("where to go", metavar="HOST:PORT", check=host_port)
    rate_per_second: float = flag("how fast", name="rate", default=1.5, check=positive)
    workers: int = flag("how many", default=4, check=at_least(1, 8))
    files: tuple[Path, ...] = flag("inputs; repeatable", name="file", default=())
    out: Path | None = flag("output", default=None)
    verbose: bool = flag("talk more", default=False)
    level: str = flag("log level", default="info", choices=LOG_LEVELS)
    not_a_flag: int = 7


EXAMPLE = Program(prog="example", env_prefix="EX", description="an example", config=Example)


def test_one_field_is_one_flag_with_its_environment_variable() -> None:
    names = [(o.flag, o.env) for o in EXAMPLE.options()]
    assert names == [
        ("--target", "EX_TARGET"),
        ("--rate", "EX_RATE"),
        ("--workers", "EX_WORKERS"),
        ("--file", "EX_FILE"),
        ("--out", "EX_OUT"),
        ("--verbose", "EX_VERBOSE"),
        ("--level", "EX_LEVEL"),
    ]


def test_flags_then_environment_then_defaults() -> None:
    config = EXAMPLE.parse(
        ["--target", "h:1", "--file", "a", "--file", "b", "--verbose"],
        environ={"EX_WORKERS": "8", "EX_RATE": "2"},
    )
    assert config == Example(
        target="h:1", rate_per_second=2.0, workers=8, files=(Path("a"), Path("b")), verbose=True
    )
    from_env = EXAMPLE.parse([], environ={"EX_TARGET": "h:2", "EX_FILE": "x,y", "EX_VERBOSE": "yes"})
    assert from_env.files == (Path("x"), Path("y"))
    assert from_env.verbose is True
    assert EXAMPLE.parse(["--target", "h:1", "--rate", "3"], environ={"EX_RATE": "9"}).rate_per_second == 3.0


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {}, "example: error: --target is required (or set EX_TARGET) (see --help)"),
        (
            ["--target", "999.1.1.1:80"],
            {},
            "'999.1.1.1' is not an IP address or host name (in '999.1.1.1:80')",
        ),
        (["--target", "h:1", "--workers", "x"], {}, "argument --workers: expected an integer, got 'x'"),
        (["--target", "h:1", "--workers", "9"], {}, "argument --workers: must be 1 to 8, got 9"),
        (["--target", "h:1"], {"EX_RATE": "-1"}, "EX_RATE (--rate): must be a positive number, got -1.0"),
        (["--target", "h:1"], {"EX_RATE": "fast"}, "EX_RATE (--rate): expected a number, got 'fast'"),
        (["--target", "h:1"], {"EX_LEVEL": "loud"}, "EX_LEVEL (--level): expected one of debug, info"),
        (["--target", "h:1"], {"EX_VERBOSE": "maybe"}, "EX_VERBOSE (--verbose): expected true or false"),
    ],
)
def test_every_problem_is_one_line_and_exit_status_2(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        EXAMPLE.parse(argv, environ=environ)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("example: error: ")
    assert message in err


def test_help_shows_default_and_environment_variable() -> None:
    text = EXAMPLE.parser().format_help()
    assert "how fast (default: 1.5) [env EX_RATE]" in " ".join(text.split())


def test_the_readme_table_comes_from_the_declaration() -> None:
    table = EXAMPLE.table().splitlines()
    assert "| `--rate` | `EX_RATE` | `1.5` | how fast |" in table
    assert "| `--target` | `EX_TARGET` |  | where to go |" in table
    assert not any("not_a_flag" in line or "not-a-flag" in line for line in table)


@pytest.mark.parametrize("program", [MARKETPLACE, AIIDA, SINK], ids=lambda p: p.prog)
def test_every_program_documents_every_flag(program: Program[object]) -> None:
    help_text = " ".join(program.parser().format_help().split())
    for option in program.options():
        assert option.help
        assert option.flag in help_text
        assert f"[env {option.env}]" in help_text


def test_marketplace_flags_keep_their_config_attributes() -> None:
    config = parse_config(
        [
            "--search-timeout",
            "2",
            "--search-rate",
            "7",
            "--aiida-ca",
            "ca.pem",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
        ]
    )
    assert config.search_timeout_default == 2.0
    assert config.search_rate_per_minute == 7.0
    assert config.aiida_tls_ca == Path("ca.pem")
    assert config.tls == TlsFiles(Path("c"), Path("k"), None)
    assert Config().tls is None


def test_marketplace_combinations_are_checked() -> None:
    with pytest.raises(SystemExit):
        parse_config(["--tls-cert", "c"])
    with pytest.raises(SystemExit):
        parse_config(["--search-timeout", "90"])
