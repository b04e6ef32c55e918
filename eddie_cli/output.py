"""Tables for people, protobuf JSON for scripts, and one-line errors on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC

from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

__all__ = ["escape"]  # re-exported for the commands

TABLE = "table"
JSON = "json"
OUTPUT_FORMATS = (TABLE, JSON)

stdout = Console(highlight=False, soft_wrap=False)
stderr = Console(stderr=True, highlight=False)


def to_json(message: Message) -> object:
    """The protobuf JSON form (camelCase names, enums by name). Fields without presence are printed
    at their default too (`"matched": 0`, `"withheld": false`, `"permissions": []`), so a script
    reads every field of the document it asked for; unset messages and oneof members stay out."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def print_json(document: object) -> None:
    """One JSON document on stdout (protobuf messages in their JSON form)."""
    if isinstance(document, Message):
        document = to_json(document)
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_json_line(document: object) -> None:
    """One JSON document on one line, for commands that follow a stream (JSON Lines)."""
    if isinstance(document, Message):
        document = to_json(document)
    sys.stdout.write(json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> None:
    """A table, or the `empty` sentence when there are no rows."""
    materialized = [list(row) for row in rows]
    if not materialized:
        stdout.print(empty)
        return
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for index, column in enumerate(columns):
        table.add_column(column, overflow="fold", no_wrap=index == 0)  # the first column: resource names
    for row in materialized:
        table.add_row(*(Text(cell) for cell in row))  # data, never markup
    stdout.print(table)


def print_fields(pairs: Sequence[tuple[str, str]]) -> None:
    """A two-column `label  value` list for one resource."""
    table = Table(show_header=False, show_edge=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in pairs:
        table.add_row(label, Text(value))
    stdout.print(table)


def say(text: str) -> None:
    """A sentence for people on stdout (table mode only); Rich markup, so `escape` what users wrote."""
    stdout.print(text)


def error(text: str) -> None:
    """`error: ...` on one line of stderr (newlines in `text` are folded)."""
    stderr.print(Text.assemble(("error:", "bold red"), " ", " ".join(text.split())), soft_wrap=True)


def when(value: timestamp_pb2.Timestamp) -> str:
    """A timestamp for people (UTC, seconds), or '-' when unset."""
    if value.seconds == 0 and value.nanos == 0:
        return "-"
    return value.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: duration_pb2.Duration) -> str:
    """A duration for people: 90 s -> '1m30s', 86400 s -> '1d'."""
    total = int(value.ToTimedelta().total_seconds())
    if total == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, total = divmod(total, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)


def enum_label(name: str, prefix: str) -> str:
    """`STATE_ACTIVE` -> `ACTIVE`."""
    return name.removeprefix(prefix)
