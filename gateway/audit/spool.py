"""The audit spool: records the store could not take, on local disk until it can (SPEC §6).

A JSON-lines file. Appends are fsync'd per batch. To replay, the file is first renamed aside
so that new appends start a fresh file; the aside file is deleted only after every record in
it was written, and a crash before that replays it again (record ids make that harmless).
All methods block on disk: AuditLog calls them in a worker thread.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

from gateway.audit.record import AuditRecord

log = logging.getLogger("sandgate.audit")

SPOOL_FILE = "audit-spool.jsonl"


class Spool:
    def __init__(self, data_dir: str):
        self.dir = data_dir
        self.path = os.path.join(data_dir, SPOOL_FILE)
        self.aside = self.path + ".replaying"

    def pending(self) -> bool:
        return os.path.exists(self.path) or os.path.exists(self.aside)

    def append(self, records: Sequence[AuditRecord]) -> None:
        os.makedirs(self.dir, exist_ok=True)
        created = not os.path.exists(self.path)
        data = "".join(r.to_json() + "\n" for r in records).encode()
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
