"""Rows and filters, shared by both stores so that they store and select alike."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping

from gateway.audit.record import AUDIT_FIELDS, EPOCH, AuditRecord
from gateway.store.base import ApiKeyRecord

# Column order of audit_events, as both stores insert and select it: an AuditRecord's fields
# (id, at, kind, request_id, route, policy, revision, principal, method, host, path, decision,
# reasons, latency_ms, detail, request_count, last_request_id, last_at, path_cut), with `at`
# and `last_at` for the record's at_us and last_at_us.
AUDIT_COLUMNS = ("id", "at", *AUDIT_FIELDS[2:17], "last_at", "path_cut")
API_KEY_COLUMNS = "id, owner, scopes, created_at, expires_at, revoked_at"
_EQUALITY_FILTERS = frozenset(AUDIT_COLUMNS) - {"id", "at", "reasons", "latency_ms", "detail", "request_count",
                                                "last_at", "path_cut"}

DecodeAt = Callable[[Any], datetime | None]


def clean(text: str) -> str:
    """Text either database accepts: request data can hold NUL (PostgreSQL refuses it in text
    and jsonb) or lone surrogates (neither driver can encode them), and one such record must not
    make its whole batch unwritable forever."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, Mapping):
        return {clean(str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """JSON text for a json/jsonb column."""
    if value == () or value == []:  # the common case, without a round through json
        return "[]"
    if value == {}:
        return "{}"
    if _strings_only(value):
        # What decisions record. Without a \uXXXX escape in the JSON, no string held a NUL, a
        # surrogate or anything else clean() would change: the text is final as it is.
        text = _encode(value)
        if "\\u" not in text:
            return text
    return _encode(_clean_json(value))


def _strings_only(value: Any) -> bool:
    """A flat dict of str to str, or a tuple or list of str."""
    kind = type(value)
    if kind is dict:
        return all(type(k) is str and type(v) is str for k, v in value.items())
    if kind is tuple or kind is list:
        return all(type(v) is str for v in value)
    return False


# One encoder for every call: json.dumps with arguments builds a new one each time.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def encode_at_us(at_us: int) -> str:
    """A record's time (microseconds since the epoch) as fixed-width UTC ISO-8601 text, which
    both stores take for their time column (SQLite keeps it as such; it sorts in time order)."""
    second, micro = divmod(at_us, 1_000_000)
    return f"{_second_text(second)}.{micro:06d}+00:00"


@lru_cache(maxsize=4)  # a batch spans a second or two
def _second_text(second: int) -> str:
    return (EPOCH + timedelta(seconds=second)).isoformat()[:-6]  # without "+00:00"


def audit_rows(records: Iterable[AuditRecord]) -> list[tuple]:
    """The records as column values in AUDIT_COLUMNS order: `at` as encode_at_us text,
    `reasons` and `detail` as JSON text. Records of one repeated decision (AuditRecord.again)
    share their reasons and detail objects: each distinct object is encoded once per call."""
    encoded: dict[int, tuple[Any, str]] = {}  # id(object) -> (object, its JSON), objects kept alive
    rows = []
    for rec in records:
        texts = rec[2:12]  # kind ... decision
        joined = "".join([t for t in texts if t is not None])  # one check instead of ten
        if not joined.isascii() or "\x00" in joined:
            texts = tuple(None if v is None else clean(v) for v in texts)
        reasons, detail = rec[12], rec[14]
        found = encoded.get(id(reasons))
        if found is None:
            found = encoded[id(reasons)] = (reasons, dumps(reasons))
        reasons_json = found[1]
        found = encoded.get(id(detail))
        if found is None:
            found = encoded[id(detail)] = (detail, dumps(detail))
        last_request_id, last_at_us = rec[16], rec[17]
        if last_request_id is not None and (not last_request_id.isascii() or "\x00" in last_request_id):
            last_request_id = clean(last_request_id)
        rows.append((rec[0], encode_at_us(rec[1]), *texts, reasons_json, rec[13], found[1], rec[15],
                     last_request_id, None if last_at_us is None else encode_at_us(last_at_us), rec[18]))
    return rows


def audit_from_row(row: Mapping[str, Any], decode_at: DecodeAt) -> AuditRecord:
    values = {c: row[c] for c in AUDIT_COLUMNS}
    values.update(id=str(row["id"]), at=decode_at(row["at"]), reasons=json.loads(row["reasons"]), detail=json.loads(row["detail"]),
                  last_at=decode_at(row["last_at"]), path_cut=bool(row["path_cut"]))
    return AuditRecord(**values)


def api_key_from_row(row: Mapping[str, Any], decode_at: DecodeAt) -> ApiKeyRecord:
    return ApiKeyRecord(
        row["id"], row["owner"], tuple(json.loads(row["scopes"])),
        decode_at(row["created_at"]), decode_at(row["expires_at"]), decode_at(row["revoked_at"]),
    )


def audit_where(filters: Mapping[str, Any], placeholder: Callable[[int], str], encode_at: Callable[[datetime], Any]) -> tuple[str, list]:
    """A WHERE clause (or "") and its arguments. Filters: any text column by equality (None
    matches NULL), `since` (at >= since) and `until` (at < until)."""
    terms: list[str] = []
    args: list = []
    for name, value in filters.items():
        if name in ("since", "until"):
            args.append(encode_at(value))
            terms.append(f"at {'>=' if name == 'since' else '<'} {placeholder(len(args))}")
        elif name in _EQUALITY_FILTERS:
            if value is None:
                terms.append(f"{name} IS NULL")
            else:
                args.append(value)
                terms.append(f"{name} = {placeholder(len(args))}")
        else:
            raise TypeError(f"unknown audit filter {name!r}")
    return (" WHERE " + " AND ".join(terms)) if terms else "", args
