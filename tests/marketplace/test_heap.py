"""The connection manager's heap freezer: debounced, and it reclaims what went away."""

from __future__ import annotations

import asyncio
import gc

import pytest

from marketplace_server.aiida.heap import HeapFreezer


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_freezes_once_after_changes_settle_and_reclaims_cycles_on_the_next_settle() -> None:
    freezer = HeapFreezer(quiet_seconds=0.05)
    try:
        for _ in range(5):  # a burst of link changes: one freeze at the end
            freezer.changed()
            await asyncio.sleep(0.01)
        assert freezer.freezes == 0
        await asyncio.sleep(0.15)
        assert freezer.freezes == 1
        assert gc.get_freeze_count() > 0

        # An object frozen while alive becomes cyclic garbage later (a link that went away):
        # the next settle unfreezes and collects it.
        doomed = _Cycle()
        freezer.changed()
        await asyncio.sleep(0.15)
        assert freezer.freezes == 2
        alive = [o for o in gc.get_objects() if isinstance(o, _Cycle)]  # frozen objects are not listed
        assert alive == []
        del doomed
        freezer.changed()
        await asyncio.sleep(0.15)
        assert freezer.freezes == 3
        gc.unfreeze()
        assert not any(isinstance(o, _Cycle) for o in gc.get_objects())
    finally:
        freezer.stop()
        gc.unfreeze()


def test_a_freeze_gives_the_freed_c_heap_back_to_the_system(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a burst (10,000 claims) the freed C heap goes back to the system (glibc malloc_trim)."""
    import sys

    from marketplace_server.aiida import heap

    if sys.platform.startswith("linux"):
        assert heap._TRIM is not None, "glibc's malloc_trim was not found"
    trimmed: list[int] = []

    def trim(pad: int) -> int:
        trimmed.append(pad)
        return 1

    monkeypatch.setattr(heap, "_TRIM", trim)
    freezer = heap.HeapFreezer()
    try:
        freezer._freeze()
    finally:
        gc.unfreeze()
    assert trimmed == [0] and freezer.freezes == 1


async def test_a_freeze_scales_the_young_generation_with_the_streams() -> None:
    """A search keeps a few objects per stream in flight: the young generation's threshold grows
    with the streams, so a search over all of them does not trigger young collections."""
    from eddie_common.collector import THRESHOLDS, YOUNG_PER_STREAM

    before = gc.get_threshold()
    streams = 10_000
    freezer = HeapFreezer(quiet_seconds=0.01, streams=lambda: streams)
    try:
        freezer._freeze()
        assert gc.get_threshold() == (YOUNG_PER_STREAM * 10_000, *THRESHOLDS[1:])
        streams = 10  # few streams: never below the base threshold
        freezer._freeze()
        assert gc.get_threshold() == THRESHOLDS
    finally:
        freezer.stop()
        gc.unfreeze()
        gc.set_threshold(*before)
