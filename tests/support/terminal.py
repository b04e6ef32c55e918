"""A program on a pseudo-terminal (stdlib `pty`), as a person at a keyboard would run it."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """The child's controlling terminal: read what it shows, type into it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec at once (the parent has threads)
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.raw = ""
        self.status: int | None = None

    @property
    def screen(self) -> str:
        """Everything shown so far, without colours and cursor movements."""
        return ANSI.sub("", self.raw)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not chunk:
            return False
        self.raw += chunk.decode("utf-8", errors="replace")
        return True

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Waits until the screen (from the start) matches `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.screen)
            if match:
                return match
            remaining = deadline - time.monotonic()
            assert remaining > 0, (
                f"no {pattern!r} on the terminal within {timeout}s; it shows:\n{self.screen}"
            )
            if not self._read(min(remaining, 0.2)):
                match = regex.search(self.screen)
                assert match, f"the program ended without showing {pattern!r}; it showed:\n{self.screen}"
                return match

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        """Reads until the program ends; its exit status."""
        deadline = time.monotonic() + timeout
        open_ = True
        while self.status is None:
            if open_:
                open_ = self._read(0.05)
            else:
                time.sleep(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"still running after {timeout}s; it shows:\n{self.screen}")
        while open_:  # what it wrote just before exiting
            open_ = self._read(0.05) and bool(select.select([self.fd], [], [], 0)[0])
        os.close(self.fd)
        return self.status

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
