"""Flags declared once: each option is one field of the program's config dataclass.

A field declared with `flag(...)` carries its help text (and optionally its flag name,
metavar, choices and a value check); its type comes from the annotation and its default
from the field. From that one declaration `Program` builds the argparse parser, reads the
environment variable `PREFIX_FLAG_NAME`, converts and checks the value, builds the typed
config and renders the README table. Adding an option is adding one field:

    metrics_listen: str | None = flag("HOST:PORT to serve /metrics on", metavar="HOST:PORT", check=host_port)

Every problem is reported as ONE line, `prog: error: --flag: what is wrong (the value)`,
and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NoReturn, Protocol, TypeVar

from eddie_common.cli import check_host_port

LOG_LEVELS = ("debug", "info", "warning", "error")
_METADATA_KEY = "eddie_flag"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

Check = Callable[[Any], None]
"""Raises ValueError saying what is wrong with a converted value (the message names the value)."""


@dataclass(frozen=True)
class Flag:
    """What a config field declares about its flag."""

    help: str
    name: str | None = None  # without dashes; default: the field name with `-` for `_`
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    check: Check | None = None


def flag(
    help: str,
    *,
    default: Any = dataclasses.MISSING,
    name: str | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    check: Check | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag (no default: a required flag)."""
    meta = {_METADATA_KEY: Flag(help, name, metavar, tuple(choices) if choices else None, check)}
    return dataclasses.field(default=default, metadata=meta)


# -- value checks ---------------------------------------------------------------------------


def host_port(value: str) -> None:
    """HOST:PORT with a valid IP address or host name and a port 0-65535."""
    check_host_port(value)


def positive(value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"must be a positive number, got {value}")


def non_negative(value: float) -> None:
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"must not be negative, got {value}")


def at_least(low: int, high: int | None = None) -> Check:
    def check(value: int) -> None:
        if value < low or (high is not None and value > high):
            bound = f"{low} to {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bound}, got {value}")

    return check


# -- options the three programs share ---------------------------------------------------------
# The kind of value, default, metavar and check of each shared option, declared once; the help
# text stays the program's own where its wording differs.

METRICS_LISTEN_HELP = (
    "HOST:PORT to serve Prometheus metrics on at /metrics (port 0 picks a free port; default: off)"
)


def log_level_flag(help: str = "log level") -> Any:
    """`--log-level`: one of LOG_LEVELS, default info."""
    return flag(help, default="info", choices=LOG_LEVELS)


def grace_period_flag(help: str, *, default: float) -> Any:
    """`--grace-period`: seconds (0 or more) in-flight calls may finish on shutdown."""
    return flag(help, default=default, metavar="SECONDS", check=non_negative)


def metrics_listen_flag() -> Any:
    """`--metrics-listen`: where to serve Prometheus metrics (default: off)."""
    return flag(METRICS_LISTEN_HELP, default=None, metavar="HOST:PORT", check=host_port)


def file_flag(help: str, *, name: str | None = None, metavar: str = "FILE") -> Any:
    """An optional file, e.g. `--tls-cert`, `--tls-key`, `--tls-client-ca` or a CA to dial with."""
    return flag(help, name=name, default=None, metavar=metavar)


def tls_problems(cert: Path | None, key: Path | None, client_ca: Path | None = None) -> list[str]:
    """What is wrong with a server's `--tls-cert`, `--tls-key` and `--tls-client-ca` together."""
    problems = []
    if (cert is None) != (key is None):
        problems.append("--tls-cert and --tls-key go together")
    if client_ca is not None and cert is None:
        problems.append("--tls-client-ca needs --tls-cert and --tls-key")
    return problems


# -- conversion -------------------------------------------------------------------------------


def _to_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"expected an integer, got {raw!r}") from None


def _to_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if math.isnan(value):
        raise ValueError(f"expected a number, got {raw!r}")
    return value


def _to_path(raw: str) -> Path:
    if not raw:
        raise ValueError("expected a path, got an empty string")
    return Path(raw)


def _to_bool(raw: str) -> bool:
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


_CONVERTERS: dict[Any, Callable[[str], Any]] = {
    str: str,
    int: _to_int,
    float: _to_float,
    Path: _to_path,
    bool: _to_bool,
}


def _shape(annotation: Any) -> tuple[Callable[[str], Any], bool]:
    """The converter of one value and whether the field is a repeatable (tuple) flag."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _shape(inner)
    if origin is tuple:
        item, *_ = typing.get_args(annotation)
        return _CONVERTERS[item], True
    return _CONVERTERS[annotation], False


@dataclass(frozen=True)
class Option:
    """One resolved flag: where it comes from and how its value is read."""

    field: str
    flag: str
    env: str
    help: str
    default: Any  # dataclasses.MISSING: required
    convert: Callable[[str], Any]
    repeat: bool
    boolean: bool
    metavar: str | None
    choices: tuple[str, ...] | None
    check: Check | None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def read(self, raw: str, source: str) -> Any:
        """Converts and checks one raw value; ValueError names `source` and the problem."""
        try:
            values = [self.convert(v) for v in raw.split(",") if v] if self.repeat else [self.convert(raw)]
            for value in values:
                self._validate(value)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        return tuple(values) if self.repeat else values[0]

    def _validate(self, value: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}, got {value!r}")
        if self.check is not None:
            self.check(value)


class _Checked(Protocol):
    def problems(self) -> list[str]: ...


C = TypeVar("C")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(frozen=True)
class Program(Generic[C]):
    """A program's flags, read from the fields of its config dataclass `config`."""

    prog: str
    env_prefix: str
    description: str
    config: type[C]

    def options(self) -> list[Option]:
        hints = typing.get_type_hints(self.config)
        options = []
        for f in dataclasses.fields(self.config):  # type: ignore[arg-type]
            declared = f.metadata.get(_METADATA_KEY)
            if declared is None:
                continue
            convert, repeat = _shape(hints[f.name])
            name = declared.name or f.name.replace("_", "-")
            options.append(
                Option(
                    field=f.name,
                    flag=f"--{name}",
                    env=f"{self.env_prefix}_{name.upper().replace('-', '_')}",
                    help=declared.help,
                    default=f.default,
                    convert=convert,
                    repeat=repeat,
                    boolean=convert is _to_bool,
                    metavar=declared.metavar,
                    choices=declared.choices,
                    check=declared.check,
                )
            )
        return options

    def parser(self) -> argparse.ArgumentParser:
        parser = OneLineParser(prog=self.prog, description=self.description)
        for option in self.options():
            _add(parser, option)
        return parser

    def parse(self, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> C:
        """Flags, then environment variables, then defaults; exits 2 with one line on any problem."""
        parser = self.parser()
        given = vars(parser.parse_args(argv))
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        try:
            for option in self.options():
                if option.field in given:
                    value = given[option.field]
                    values[option.field] = tuple(value) if option.repeat else value
                elif option.env in env:
                    values[option.field] = option.read(env[option.env], f"{option.env} ({option.flag})")
                elif option.required:
                    raise ValueError(f"{option.flag} is required (or set {option.env})")
        except ValueError as exc:
            parser.error(str(exc))
        config = self.config(**values)
        problems = config.problems() if _has_problems(config) else []
        if problems:
            parser.error("; ".join(problems))
        return config

    def table(self) -> str:
        """The README table of this program's flags."""
        lines = [f"**`{self.prog}`**", "", "| flag | environment | default | meaning |", "|---|---|---|---|"]
        for o in self.options():
            default = "" if o.required or o.default in (None, ()) else f"`{_show(o.default)}`"
            meaning = o.help.replace("|", "\\|")
            lines.append(f"| `{o.flag}` | `{o.env}` | {default} | {meaning} |")
        return "\n".join(lines)


def _has_problems(config: object) -> typing.TypeGuard[_Checked]:
    return callable(getattr(config, "problems", None))


def _show(value: Any) -> str:
    return str(value)


def _add(parser: argparse.ArgumentParser, option: Option) -> None:
    shown = "" if option.required or option.default in (None, ()) else f" (default: {_show(option.default)})"
    help_text = f"{option.help}{shown} [env {option.env}]".replace("%", "%%")
    if option.boolean:
        parser.add_argument(option.flag, dest=option.field, action="store_true", default=argparse.SUPPRESS,
                            help=help_text)  # fmt: skip
        return
    parser.add_argument(
        option.flag,
        dest=option.field,
        type=_argparse_type(option),
        action="append" if option.repeat else "store",
        default=argparse.SUPPRESS,
        metavar=option.metavar or (None if option.choices else option.flag.lstrip("-").upper()),
        choices=option.choices,
        help=help_text,
    )


def _argparse_type(option: Option) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        try:
            value = option.convert(raw)
            if option.check is not None:
                option.check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return convert
