"""Operational logs as JSON lines on stderr (the access log has stdout to itself)."""

from __future__ import annotations

import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp logs every client disconnect mid-response at ERROR; for a proxy that is routine.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    """Log a message with structured fields that become JSON keys."""
    logger.log(level, msg, extra={"fields": fields})

