"""Group commit: every Publish stream hands readings to one writer task.

The writer stores whatever has queued up while its previous transaction ran,
in one transaction. With little traffic a reading is committed about a
millisecond after it arrives; under load the batches grow by themselves, up to
`max_pending` readings, beyond which publishers wait (backpressure).
"""

from __future__ import annotations

import asyncio
import logging

from eddie_common.errors import Unavailable
from eddie_common.logging import log_event
from eddie_sink.readings import StoredReading
from eddie_sink.store import ReadingStore

log = logging.getLogger(__name__)

MAX_PENDING_READINGS = 10_000


class ReadingWriter:
    """Batches readings from all streams into few transactions."""

    def __init__(self, store: ReadingStore, *, max_pending: int = MAX_PENDING_READINGS) -> None:
        self._store = store
        self._max_pending = max_pending
        self._pending: list[StoredReading] = []
        self._committed = self._new_future()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # Read by the metrics: readings committed, and how many of them were new (not duplicates).
        self.committed_readings = 0
        self.stored_readings = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="reading-writer")

    async def submit(self, reading: StoredReading) -> asyncio.Future[None]:
        """Queues `reading`; the returned future resolves once it is committed (or fails)."""
        while len(self._pending) >= self._max_pending and not self._closing:
            self._room.clear()
            await self._room.wait()
        if self._closing:
            raise Unavailable("the sink is shutting down", reason="SHUTTING_DOWN")
        self._pending.append(reading)
        self._wakeup.set()
        return self._committed

    async def close(self) -> None:
        """Commits what is queued, then stops."""
        self._closing = True
        self._wakeup.set()
        self._room.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch, committed = self._pending, self._committed
            self._pending, self._committed = [], self._new_future()
            self._room.set()
            await self._commit(batch, committed)

    async def _commit(self, batch: list[StoredReading], committed: asyncio.Future[None]) -> None:
        try:
            stored = await self._store.insert_readings(batch)
        except Exception as exc:
            log_event(
                log, "readings_not_stored", logging.ERROR, readings=len(batch), error=type(exc).__name__
            )
            committed.set_exception(exc)
            return
        self.committed_readings += len(batch)
        self.stored_readings += stored
        committed.set_result(None)
        log_event(log, "readings_stored", logging.DEBUG, received=len(batch), stored=stored)

    @staticmethod
    def _new_future() -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A failed batch nobody waits for (its streams ended) must not warn at garbage collection.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future


class StreamReceipts:
    """The commits one Publish stream still waits for; fails fast if one of them failed."""

    def __init__(self) -> None:
        self._waiting: list[asyncio.Future[None]] = []

    def add(self, committed: asyncio.Future[None]) -> None:
        if self._waiting and self._waiting[-1] is committed:
            return
        self._prune()
        self._waiting.append(committed)

    def _prune(self) -> None:
        still_waiting = []
        for future in self._waiting:
            if not future.done():
                still_waiting.append(future)
            elif (error := future.exception()) is not None:
                raise error
        self._waiting = still_waiting

    async def wait_all(self) -> None:
        """Returns once every reading of the stream is committed; raises if one was not."""
        await asyncio.gather(*self._waiting)
        self._waiting = []

    async def settle(self) -> None:
        """Waits for the stream's commits, successful or not."""
        await asyncio.gather(*self._waiting, return_exceptions=True)
        self._waiting = []
