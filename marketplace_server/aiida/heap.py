"""Keeps the garbage collector from re-walking the long-lived connection objects.

Thousands of links, calls and channels live for hours; every full collection
walks them all, which shows up as latency spikes on the search path (gc.freeze
improved the floor's p50 by 10-20 % at 5,000 streams, see PERFORMANCE.md). Once
the set of connected instances has been quiet for a moment, the heap is collected
once and frozen (moved to the permanent generation). Each later settle unfreezes,
collects (so objects of links that went away are reclaimed) and freezes again.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import sys
import time
from collections.abc import Callable

from eddie_common.collector import tune_collector
from eddie_common.logging import log_event

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another libc, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


class HeapFreezer:
    def __init__(self, quiet_seconds: float = 3.0, streams: Callable[[], int] | None = None) -> None:
        self.quiet_seconds = quiet_seconds
        self.streams = streams  # how many long-lived streams there are: the collector is tuned to it
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.freezes = 0

    def changed(self) -> None:
        """The set of long-lived objects changed; freeze once it has been quiet for a while.

        Called once per stream coming up or going down (10,000 times in a few seconds after a
        restart), so it only moves the due time; the one timer re-arms itself until it is due.
        """
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.quiet_seconds
        if self._timer is None:
            self._timer = loop.call_at(self._due, self._check)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._due:
            self._timer = loop.call_at(self._due, self._check)
            return
        self._timer = None
        self._freeze()

    def _freeze(self) -> None:
        started = time.perf_counter()
        if self.streams is not None:
            tune_collector(self.streams())
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        if _TRIM is not None:
            # What a burst freed (10,000 claims, a reconnect storm: their requests, sessions and
            # buffers) goes back to the system instead of staying in the C heap's free lists:
            # measured 41.0 -> 33.x KiB per connected AIIDA after claiming 10,000.
            _TRIM(0)
        self.freezes += 1
        log_event(
            log,
            "heap_frozen",
            logging.DEBUG,
            objects=gc.get_freeze_count(),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
