"""Prints the configuration tables of the three programs from their argument parsers.

`python scripts/flags_table.py --write` refreshes the section of README.md between the
`<!-- flags:begin -->` and `<!-- flags:end -->` markers; tests/test_docs.py fails if it is stale.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- flags:begin -->", "<!-- flags:end -->"


def _table(program: str, parser: argparse.ArgumentParser) -> str:
    env_names: dict[str, str] = getattr(parser, "env_names", {})
    lines = [f"**`{program}`**", "", "| flag | environment | default | meaning |", "|---|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = max(action.option_strings, key=len)
        default = "" if action.default in (None, argparse.SUPPRESS) else f"`{action.default}`"
        meaning = (action.help or "").split(" [env ")[0].replace("|", "\\|").replace("%%", "%")
        lines.append(f"| `{flag}` | `{env_names.get(action.dest, '')}` | {default} | {meaning} |")
    return "\n".join(lines)


def tables() -> str:
    for name in list(os.environ):  # defaults as documented, not as this shell has them
        if name.startswith(("MARKETPLACE_", "AIIDA_", "EDDIE_SINK_")):
            del os.environ[name]
    from aiida_stub.config import build_parser as aiida_parser
    from eddie_sink.config import build_parser as sink_parser
    from marketplace_server.config import build_parser as marketplace_parser

    return "\n\n".join(
        [
            _table("marketplace-server", marketplace_parser()),
            _table("aiida-stub", aiida_parser()),
            _table("eddie-sink", sink_parser()),
        ]
    )


def render(readme: str) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{tables()}\n{END}{tail}"


if __name__ == "__main__":
    text = README.read_text()
    if BEGIN not in text:
        sys.exit(f"README.md has no {BEGIN} marker")
    new = render(text)
    if "--write" in sys.argv:
        README.write_text(new)
    else:
        print(tables())
