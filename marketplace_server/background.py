"""A background loop that can be woken early and stops between iterations.

Stopping lets the current iteration finish (it may be in a transaction)
instead of cancelling it, and the sleep uses `asyncio.timeout`, not
`asyncio.wait_for`, which in Python 3.11 can swallow a cancellation that
arrives just as the awaited event fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

__all__ = ["Loop"]

log = logging.getLogger(__name__)

ERROR_PAUSE = 1.0


class Loop:
    """Calls `iterate()` (which returns seconds to sleep) until `stop()`."""

    def __init__(self, iterate: Callable[[], Awaitable[float]], name: str) -> None:
        self.iterate = iterate
        self.name = name
        self.stopping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self._task = asyncio.current_task()  # type: ignore[assignment]
        while not self.stopping:
            self._wake.clear()  # a wake during the iteration runs the next one at once
            try:
                delay = await self.iterate()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background_iteration_failed", extra={"loop": self.name})
                delay = ERROR_PAUSE
            if self.stopping:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """Ends the loop after its current iteration (cancelled if that takes longer than `timeout`)."""
        self.stopping = True
        self._wake.set()
        task = self._task
        if task is None or task.done():
            return
        _, pending = await asyncio.wait({task}, timeout=timeout)
        for late in pending:
            late.cancel()
