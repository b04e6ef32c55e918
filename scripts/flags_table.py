"""Prints the configuration tables of the three programs from their flag declarations.

`python scripts/flags_table.py --write` refreshes the section of README.md between the
`<!-- flags:begin -->` and `<!-- flags:end -->` markers; tests/test_docs.py fails if it is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- flags:begin -->", "<!-- flags:end -->"


def tables() -> str:
    from aiida_stub.config import PROGRAM as AIIDA
    from eddie_sink.config import PROGRAM as SINK
    from marketplace_server.config import PROGRAM as MARKETPLACE

    return "\n\n".join(program.table() for program in (MARKETPLACE, AIIDA, SINK))


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
