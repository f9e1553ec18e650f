"""The audit pipeline: record() on the request path, batched writes to the store behind it.

record() only appends to an in-memory queue. A writer task flushes what is queued every 200 ms,
or sooner once 500 records wait. When the store fails, batches go to the spool on local disk and
the writer stops trying the store; a replay loop probes it (every 1 s, backing off to 10 s),
hands new batches back to the store once it answers and writes the spool back. Nothing is lost
on an outage or on stop(); a spool left by a previous run is replayed after start().
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Callable

from gateway.audit.record import AuditRecord
from gateway.audit.spool import Spool

if TYPE_CHECKING:
    from gateway.store.base import Store

log = logging.getLogger("sandgate.audit")


class AuditLog:
    def __init__(
        self,
        store: Store,
        data_dir: str,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        replay_interval: float = 1.0,
        max_replay_interval: float = 10.0,
        on_depth: Callable[[int], None] | None = None,
        on_spooled: Callable[[int], None] | None = None,
        stop_replay_seconds: float = 10.0,
    ):
        self._stop_replay_seconds = stop_replay_seconds
        self._store = store
        self._spool = Spool(data_dir)
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._replay_interval = replay_interval
        self._max_replay_interval = max_replay_interval
        self._on_depth = on_depth  # called by the writer after each flush with the queue depth
        self._on_spooled = on_spooled  # called with the number of records each spooled batch held
        self._queue: deque[AuditRecord] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._store_up = True
        self._spool_lock = asyncio.Lock()  # an append and a set-aside never interleave
        self._spooled_total = 0
        self._writer: asyncio.Task | None = None
        self._replayer: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def spooled_total(self) -> int:
        return self._spooled_total

    def record(self, rec: AuditRecord) -> None:
        """Queue one record; O(1), never blocks, never raises."""
        self._queue.append(rec)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        self._replayer = asyncio.create_task(self._replay_loop(), name="audit-replay")

    async def stop(self) -> None:
        """Flush the queue to the store, or to the spool if the store is down."""
        self._stopping = True
        self._wake.set()
        # The writer is never cancelled: a cancelled writer could drop a batch it had taken.
        await self._writer
        # Cancelling a replay is safe: the aside file stays and the next start replays it.
        self._replayer.cancel()
        await asyncio.gather(self._replayer, return_exceptions=True)
        if self._spool.pending():
            # The store may be back since the replay loop last looked: a pod's data dir may not
            # outlive it, so write the spool now if the store answers (bounded: we are draining).
            try:
                await asyncio.wait_for(self._replay(), self._stop_replay_seconds)
            except TimeoutError:
                log.warning("audit: spool not written back before shutdown; the next start replays it")
        if self._queue:
            log.error("audit: %d records lost: neither the store nor the spool took them", len(self._queue))

    async def _write_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._flush()
        while self._queue and await self._flush():  # what arrived while the last flushes ran
            pass

    async def _flush(self) -> bool:
        """Deliver what is queued now; False when some of it stays queued.

        What arrives while this flush writes waits for the next one (the timer, or a full
        batch): under steady load the store gets a few big batches, not a stream of small ones
        each paying for its own transaction, fsync and hand-off to a worker thread."""
        due = len(self._queue)
        delivered = True
        while due > 0:
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, due))]
            due -= len(batch)
            if not await self._deliver(batch):
                # Keep them, in order, for the next flush rather than retrying in a tight loop.
                self._queue.extendleft(reversed(batch))
                delivered = False
                break
        if self._on_depth:
            self._on_depth(len(self._queue))
        return delivered

    async def _deliver(self, batch: list[AuditRecord]) -> bool:
        if self._store_up:
            try:
                await self._store.write_audit(batch)
                return True
            except Exception as e:  # whatever the failure, the batch is kept: spool it
                log.warning("audit: store write failed, spooling until it answers: %s", e)
                self._store_up = False
        try:
            async with self._spool_lock:
                await asyncio.to_thread(self._spool.append, batch)
        except OSError as e:
            log.error("audit: spool append failed, %d records wait in memory: %s", len(batch), e)
            return False
        self._spooled_total += len(batch)
        if self._on_spooled:
            self._on_spooled(len(batch))
        return True

    async def _replay_loop(self) -> None:
        delay = self._replay_interval
        while True:
            if not self._store_up or self._spool.pending():
                if await self._replay():
                    delay = self._replay_interval
                else:
                    delay = min(delay * 2, self._max_replay_interval)
            await asyncio.sleep(delay)

    async def _replay(self) -> bool:
        """Probe the store and write the spool back; True when the store took all of it."""
        if not await self._store.ping():
            return False
        self._store_up = True  # new batches go to the store again while the spool drains
        replayed = 0
        try:
            while True:
                async with self._spool_lock:
                    if not await asyncio.to_thread(self._spool.set_aside):
                        break
                batches = self._spool.read_aside(self._batch_size)
                while batch := await asyncio.to_thread(next, batches, None):
                    replayed += await self._store.write_audit(batch)
                await asyncio.to_thread(self._spool.discard_aside)
        except Exception as e:  # the aside file stays; a later replay sends it again
            log.warning("audit: spool replay failed, retrying later: %s", e)
            return False
        finally:
            if replayed:
                log.info("audit: %d spooled records written to the store", replayed)
        return True
