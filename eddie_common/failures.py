"""Start-up failures: what failed (with the value, never a secret), a hint, and the exit status."""

from __future__ import annotations


class StartupError(Exception):
    """A failure an operator can act on: what failed (with the value, never a secret) and a hint."""

    status = 1

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint

    def line(self, program: str) -> str:
        hint = f" — {self.hint}" if self.hint else ""
        return f"{program}: error: {self.problem}{hint}"


class UsageError(StartupError):
    """The flags or files given cannot work (exit status 2)."""

    status = 2


class Unavailable(StartupError):
    """A dependency (database, marketplace, broker) is not there or refuses us (exit status 1)."""

    status = 1
