"""The audit spool: records the store could not take, on local disk until it can (SPEC §6).

A JSON-lines file. Appends are fsync'd per batch. To replay, the file is first renamed aside
so that new appends start a fresh file; the aside file is deleted only after every record in
it was written, and a crash before that replays it again (record ids make that harmless).
All methods block on disk: AuditLog calls them in a worker thread.

The spool is capped (`--audit-spool-max`, SPEC §6): the live file and the one being replayed
together never exceed `max_bytes`; append() keeps the records that fit and says how many it
could not keep, for AuditLog to count and log.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

from gateway.audit.record import AuditRecord

log = logging.getLogger("sandgate.audit")

SPOOL_FILE = "audit-spool.jsonl"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB


class Spool:
    def __init__(self, data_dir: str, max_bytes: int = DEFAULT_MAX_BYTES):
        self.dir = data_dir
        self.path = os.path.join(data_dir, SPOOL_FILE)
        self.aside = self.path + ".replaying"
        self.max_bytes = max_bytes

    def pending(self) -> bool:
        return os.path.exists(self.path) or os.path.exists(self.aside)

    def size(self) -> int:
        return sum(os.path.getsize(p) for p in (self.path, self.aside) if os.path.exists(p))

    def append(self, records: Sequence[AuditRecord]) -> int:
        """Append the records that fit under max_bytes, in order; returns how many did not."""
        os.makedirs(self.dir, exist_ok=True)
        created = not os.path.exists(self.path)
        room = self.max_bytes - self.size() - 1  # the newline a torn last line may need
        lines = []
        for r in records:
            line = (r.to_json() + "\n").encode()
            if len(line) > room:
                break
            room -= len(line)
            lines.append(line)
        if not lines:
            return len(records)
        data = b"".join(lines)
        with open(self.path, "a+b") as f:
            # A crash mid-append can leave a torn last line; start on a fresh line so that
            # the first record of this batch is not glued to it and lost with it.
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if created:
            self._fsync_dir()
        return len(records) - len(lines)

    def set_aside(self) -> bool:
        """Make the aside file the one to replay; False when nothing is spooled. An aside file
        left by an unfinished replay goes first, before newer records are set aside over it."""
        if os.path.exists(self.aside):
            return True
        if not os.path.exists(self.path):
            return False
        os.replace(self.path, self.aside)
        self._fsync_dir()
        return True

    def read_aside(self, batch_size: int) -> Iterator[list[AuditRecord]]:
        """The aside file's records in batches; a torn or corrupt line is logged and skipped."""
        batch: list[AuditRecord] = []
        with open(self.aside, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    batch.append(AuditRecord.from_json(line))
                except (ValueError, TypeError, KeyError) as e:
                    log.warning("skipping unreadable audit spool line %d: %s", number, e)
                    continue
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def discard_aside(self) -> None:
        os.remove(self.aside)
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        # Creating, renaming and removing are directory entries: durable only once the directory is.
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
