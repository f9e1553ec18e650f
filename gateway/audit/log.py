"""The audit pipeline: record() on the request path, batched writes to the store behind it.

record() only appends to an in-memory queue. A writer task flushes what is queued every 200 ms,
or sooner once 500 records wait. When the store fails, batches go to the spool on local disk and
the writer stops trying the store; a replay loop probes it (every 1 s, backing off to 10 s),
hands new batches back to the store once it answers and writes the spool back. Nothing is lost
on an outage or on stop(); a spool left by a previous run is replayed after start().

Volume (SPEC §6): policy decisions come in through decided(), which in rollup mode (the
default) counts a repeated decision in its rollup slot (gateway.audit.rollup) instead of
queueing a record; the writer closes slots whose window ended before each flush, stop()
closes all of them. The spool is capped: what it cannot keep is dropped, counted
(dropped_total, on_dropped) and logged. Records older than `retention` are deleted in batches
of RETENTION_BATCH rows by a periodic task.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Callable

from gateway.audit.record import AuditRecord
from gateway.audit.rollup import MAX_BYTES, MAX_SLOTS, WINDOW_SECONDS, Rollups, Slot
from gateway.audit.spool import DEFAULT_MAX_BYTES, Spool

if TYPE_CHECKING:
    from gateway.store.base import Store

log = logging.getLogger("sandgate.audit")

ALLOWED_MODES = ("rollup", "every")  # --audit-allowed
DEFAULT_RETENTION = timedelta(days=30)  # --audit-retention
RETENTION_BATCH = 1000  # rows per DELETE: short statements that never hold a long lock


@dataclass(frozen=True)
class AuditSettings:
    """What `sandgate serve` decides about the audit volume (SPEC §6), as AuditLog's arguments."""

    allowed: str = "rollup"  # --audit-allowed rollup|every
    retention: timedelta | None = DEFAULT_RETENTION  # --audit-retention; None keeps records forever
    spool_max_bytes: int = DEFAULT_MAX_BYTES  # --audit-spool-max
    rollup_window: float = WINDOW_SECONDS  # SPEC: 60 s; tests shorten it
    rollup_max_slots: int = MAX_SLOTS  # the rollup table's bounds (gateway.audit.rollup)
    rollup_max_bytes: int = MAX_BYTES
    retention_interval: float = 3600.0  # how often expired records are looked for

    def arguments(self) -> dict:
        """AuditLog's keyword arguments."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


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
        on_dropped: Callable[[int], None] | None = None,
        stop_replay_seconds: float = 10.0,
        allowed: str = "rollup",
        rollup_window: float = WINDOW_SECONDS,
        rollup_max_slots: int = MAX_SLOTS,
        rollup_max_bytes: int = MAX_BYTES,
        retention: timedelta | None = DEFAULT_RETENTION,  # None: keep records forever
        retention_interval: float = 3600.0,
        spool_max_bytes: int = DEFAULT_MAX_BYTES,
        max_queued: int = 100_000,  # records kept in memory while neither store nor spool takes them
    ):
        if allowed not in ALLOWED_MODES:
            raise ValueError(f"audit mode {allowed!r}: expected one of {', '.join(ALLOWED_MODES)}")
        self._stop_replay_seconds = stop_replay_seconds
        self._store = store
        self._spool = Spool(data_dir, spool_max_bytes)
        # None in `every` mode: each decision is queued as its own record.
        self.rollups = Rollups(self.record, window=rollup_window, max_slots=rollup_max_slots,
                               max_bytes=rollup_max_bytes) if allowed == "rollup" else None
        self._retention = retention
        self._retention_interval = retention_interval
        self._on_dropped = on_dropped
        self._dropped_total = 0
        self._max_queued = max_queued
        self.retention_deleted_total = 0
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
        self._retainer: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def spooled_total(self) -> int:
        return self._spooled_total

    @property
    def dropped_total(self) -> int:
        """Records neither the store nor the capped spool could keep."""
        return self._dropped_total

    def record(self, rec: AuditRecord) -> None:
        """Queue one record; O(1), never blocks, never raises."""
        self._queue.append(rec)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    def decided(self, rec: AuditRecord, rule_index: int | None = None) -> Slot | None:
        """Record a policy decision of route rule `rule_index`: in rollup mode it is counted in
        its slot (returned; a repeat when slot.count > 0 afterwards), in `every` mode queued as
        it is (None)."""
        if self.rollups is None:
            self.record(rec)
            return None
        return self.rollups.decided(rec, rule_index)

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        self._replayer = asyncio.create_task(self._replay_loop(), name="audit-replay")
        if self._retention is not None:
            self._retainer = asyncio.create_task(self._retention_loop(), name="audit-retention")

    async def stop(self) -> None:
        """Close every rollup, flush the queue to the store, or to the spool if the store is down."""
        self._stopping = True
        self._wake.set()
        # The writer is never cancelled: a cancelled writer could drop a batch it had taken.
        await self._writer
        # Cancelling a replay is safe: the aside file stays and the next start replays it;
        # cancelling retention too: each batch is its own statement.
        for task in (self._replayer, self._retainer):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._replayer, self._retainer) if t is not None), return_exceptions=True)
        if self._spool.pending():
            # The store may be back since the replay loop last looked: a pod's data dir may not
            # outlive it, so write the spool now if the store answers (bounded: we are draining).
            try:
                await asyncio.wait_for(self._replay(), self._stop_replay_seconds)
            except TimeoutError:
                log.warning("audit: spool not written back before shutdown; the next start replays it")
        if self._queue:
            self._drop(list(self._queue), "at shutdown neither the store nor the spool took them")
            self._queue.clear()

    async def _write_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if self.rollups is not None:
                self.rollups.close_due()
            await self._flush()
        if self.rollups is not None:
            self.rollups.close_all()  # their counts are records like any other: flushed below
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
                if len(self._queue) + len(batch) > self._max_queued:
                    # Neither the store nor the spool takes anything (a full disk): memory is
                    # the last place left, and it is bounded too.
                    self._drop(batch, "the store is down and the spool cannot be written")
                    continue
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
                dropped = await asyncio.to_thread(self._spool.append, batch)
        except OSError as e:
            log.error("audit: spool append failed, %d records wait in memory: %s", len(batch), e)
            return False
        kept = len(batch) - dropped
        if kept:
            self._spooled_total += kept
            if self._on_spooled:
                self._on_spooled(kept)
        if dropped:
            why = f"the spool is full (--audit-spool-max {self._spool.max_bytes} bytes) and the store is down"
            self._drop(batch[kept:], why)
        return True

    def _drop(self, records: list[AuditRecord], why: str) -> None:
        self._dropped_total += len(records)
        if self._on_dropped:
            self._on_dropped(len(records))
        log.error("audit: %s: %d records dropped, %d in all", why, len(records), self._dropped_total)

    async def _retention_loop(self) -> None:
        while True:
            if self._store_up:
                await self.delete_expired()
            await asyncio.sleep(self._retention_interval)

    async def delete_expired(self) -> int:
        """Delete records older than the retention, RETENTION_BATCH rows per statement; returns
        how many were deleted. A failure is logged and the next period tries again."""
        cutoff = datetime.now(timezone.utc) - self._retention
        deleted = 0
        try:
            while True:
                n = await self._store.delete_audit_before(cutoff, RETENTION_BATCH)
                deleted += n
                if n < RETENTION_BATCH:
                    break
                await asyncio.sleep(0.05)  # let the writer's batches in between
        except Exception as e:  # the store may be down: the records stay until the next period
            log.warning("audit: retention delete failed, retrying in %.0f s: %s", self._retention_interval, e)
        if deleted:
            self.retention_deleted_total += deleted
            log.info("audit: %d records older than %s deleted", deleted, self._retention)
        return deleted

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
