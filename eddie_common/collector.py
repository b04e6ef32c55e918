"""The garbage collector's thresholds for a process holding thousands of long-lived streams.

CPython collects the young generation every 700 net allocations and walks every
unfrozen object in a full collection. A process that holds thousands of streams
(the marketplace, an aiida-stub fleet) allocates several objects per stream per
message, so with the defaults it ran thousands of young collections per search
and a full one every few thousand streams opened, each walking all the streams.

Measured: the marketplace's CPU per instance per search at 10,000 fell from
108-114 to 84 us (young collections had been 0.55 s of the 1.2 s a search took);
an aiida-stub fleet of 10,000 took 4.4 -> 3.6 s of CPU to accept 10,000 new
streams after a marketplace restart, which then reached them all in 4.3-4.7 s
instead of 5.2-5.4 s. The price is up to 50,000 young objects of cyclic garbage
waiting a little longer: a few MiB.
"""

from __future__ import annotations

import gc
import logging

from eddie_common.logging import log_event

log = logging.getLogger(__name__)

THRESHOLDS = (50_000, 20, 10)
# Young objects allowed per stream before a collection. A young collection is due when the tracked
# objects allocated since the last one, less those freed, pass the first threshold; during a search
# every stream has a few in flight (a write, its future, a read, its coroutine, the reply), so a
# fixed 50,000 ran three or four young collections per search at 10,000 streams, each walking the
# ~50,000 live futures and coroutines of the search in flight (gc.callbacks: 3.7 s over 26
# searches, 14 of the 75 us of marketplace CPU per instance per search). Scaled with the streams,
# a search runs none: 75 -> 61-64 us per instance, p50 690 -> 574-589 ms at 10,000. Cyclic garbage
# waits for at most this many objects per stream (a few KiB per stream; the heap freezer collects
# at every settle anyway).
YOUNG_PER_STREAM = 25


def thresholds_for(streams: int) -> tuple[int, int, int]:
    """The collector's thresholds for a process holding `streams` long-lived streams."""
    return (max(THRESHOLDS[0], YOUNG_PER_STREAM * streams), *THRESHOLDS[1:])


def tune_collector(streams: int = 0) -> None:
    """Sets `thresholds_for(streams)` (at start-up, and again when the number of streams settles)."""
    thresholds = thresholds_for(streams)
    if gc.get_threshold() != thresholds:
        gc.set_threshold(*thresholds)
        log_event(log, "gc_thresholds", logging.DEBUG, thresholds=list(thresholds))
