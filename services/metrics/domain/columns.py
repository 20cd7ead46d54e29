"""Event records → the Arrow table ClickHouse stores, with ``AttemptEvent`` as the authority.

::

    records ──Arrow's JSON reader──▶ typed columns ──checks──▶ rows AttemptEvent accepts ──┐
       │  (a chunk Arrow cannot read is halved until the record at fault is alone)          ├─▶ table
       └─ what the checks cannot vouch for ─▶ AttemptEvent.model_validate_json ─▶ accepted ┘
                                                                   └─▶ refused: dead letter
    table ──store limits (UInt16, UInt32, DateTime64 range)──▶ out of range: dead letter

Whatever a record holds, it ends as a row or a refusal, never as an exception out of ``decode``:
a chunk that fails in any way is decoded again in halves until the record at fault is alone, and
that record is refused with the error (so a value no step foresaw costs a dead letter, not a
writer stuck retrying the batch).

Why two paths: validating each record with pydantic and turning its objects into Arrow columns
costs about as much as the rest of the writer together; Arrow's reader goes from the bytes to
typed columns in half that, and the checks below run on whole columns (docs/hot-path.md). The fast path only takes rows it can vouch for: every field present
and non-null (``ttft_ms`` and ``route_score`` excepted), the JSON type of each field exactly as AttemptEvent reads it
(Arrow refuses ``1.0`` for an integer or ``"1"`` for a number, pydantic may coerce: such records
take the slow path), ``ts`` in the exact ISO 8601 form, the schema's own constraints, and
integers within their columns (whatever bounds the schema sets). Anything else is decided by
``AttemptEvent`` itself, so no record is stored that the schema refuses, and both paths store the
same values (tests/unit/test_event_columns.py holds them to it).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from schemas.v1 import (
    INPUT_NOISE_FORM,
    SCHEMA_VERSION,
    AttemptEvent,
    AttemptStatus,
    CascadeStep,
    Variant,
)

# The llm_events columns (services/metrics/adapters/store.py DDL), as Arrow types.
TABLE_SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("ms", tz="UTC")),
        ("event_id", pa.string()),
        ("request_id", pa.string()),
        ("tier", pa.string()),
        ("model", pa.string()),
        ("provider", pa.string()),
        ("rule", pa.string()),
        ("config_hash", pa.string()),
        ("attempt", pa.uint16()),
        ("status", pa.string()),
        ("error_code", pa.string()),
        ("tokens_in", pa.uint32()),
        ("tokens_out", pa.uint32()),
        ("latency_ms", pa.float64()),
        ("ttft_ms", pa.float64()),
        ("cost_usd", pa.float64()),
        ("response_sha256", pa.string()),
        ("tenant_hash", pa.string()),
        ("worker_config_hash", pa.string()),
        ("experiment", pa.string()),
        ("variant", pa.string()),
        ("share_pct", pa.float64()),
        ("route_score", pa.float64()),
        ("cascade_step", pa.string()),
        ("verdict", pa.string()),
        ("verdict_reason", pa.string()),
        ("retry", pa.uint16()),
        ("input_noise", pa.string()),
        ("context_window", pa.uint32()),
    ]
)
COLUMNS = tuple(TABLE_SCHEMA.names)

# Before the store limits are applied: integers as JSON has them, timestamps in microseconds.
_WIDE_TYPES = {
    "ts": pa.timestamp("us", tz="UTC"),
    "attempt": pa.int64(),
    "tokens_in": pa.int64(),
    "tokens_out": pa.int64(),
    "retry": pa.int64(),
    "context_window": pa.int64(),
}
_WIDE_SCHEMA = pa.schema(
    [pa.field(f.name, _WIDE_TYPES.get(f.name, f.type)) for f in TABLE_SCHEMA]
    + [pa.field("_record", pa.int64())]  # which input record the row came from
)
# What Arrow's reader extracts: every field as the JSON type AttemptEvent expects.
_READ_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int64()),
        *(pa.field(f.name, pa.string() if f.name == "ts" else f.type) for f in _WIDE_SCHEMA),
    ][:-1]
)
_READ_OPTIONS = pj.ReadOptions(use_threads=False, block_size=1 << 26)
_PARSE_OPTIONS = pj.ParseOptions(explicit_schema=_READ_SCHEMA, unexpected_field_behavior="ignore")
_NULLABLE = frozenset({"ttft_ms", "route_score"})
_STATUSES = pa.array(get_args(AttemptStatus))
_VARIANTS = pa.array(["", *get_args(Variant)])
_STEPS = pa.array(get_args(CascadeStep))
_VERDICTS = pa.array(["", "accepted", "rejected"])
# The one timestamp form the fast path takes (AttemptEvent's own output), years 1900 to 2299.
_TS_FORM = (
    r"^(19|2[0-2])\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
# ClickHouse's column types: UInt16, UInt32, DateTime64 (1900-01-01 to 2299-12-31).
_UINT16_MAX = 2**16 - 1
_UINT32_MAX = 2**32 - 1
_TS_MIN = datetime(1900, 1, 1, tzinfo=UTC)
_TS_MAX = datetime(2299, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
_LIMITS: dict[str, tuple[Any, Any, str]] = {
    "attempt": (0, _UINT16_MAX, "UInt16"),
    "tokens_in": (0, _UINT32_MAX, "UInt32"),
    "tokens_out": (0, _UINT32_MAX, "UInt32"),
    "retry": (0, _UINT16_MAX, "UInt16"),
    "context_window": (0, _UINT32_MAX, "UInt32"),
    "ts": (_TS_MIN, _TS_MAX, "DateTime64(3)"),
}
# Rows as stored, plus the input record each came from.
_STORED_SCHEMA = TABLE_SCHEMA.append(pa.field("_record", pa.int64()))


class Unstorable(ValueError):
    """A valid event with a value its ClickHouse column cannot hold."""


class _Unframed(ValueError):
    """The chunk is not one JSON object per line, so rows would not map back to records."""


@dataclass
class Decoded:
    """A batch's storable rows, the input position each row came from, and why each other
    record is refused (by input position)."""

    table: pa.Table
    refused: list[tuple[int, Exception]] = field(default_factory=list)
    positions: pa.Array = field(default_factory=lambda: pa.array([], pa.int64()))

    def event_ids(self) -> pa.Array:
        return self.table.column("event_id").combine_chunks()


def decode(values: Sequence[bytes | None]) -> Decoded:
    """``values`` (Kafka record values) → storable rows and refused records; every record ends
    as exactly one of the two."""
    tables, refused = _isolating(values, list(range(len(values))))
    table = pa.concat_tables(tables) if tables else _STORED_SCHEMA.empty_table()
    refused.sort(key=lambda r: r[0])
    positions = table.column("_record").combine_chunks()
    return Decoded(table.drop_columns(["_record"]), refused, positions)


def events_table(events: Sequence[AttemptEvent]) -> pa.Table:
    """Already validated events → rows (events the table cannot hold raise ``Unstorable``)."""
    for event in events:
        if misfit := _misfit(event):
            raise misfit
    table, unstorable = _apply_store_limits(_wide_from_events(events, range(len(events))))
    if unstorable:
        raise unstorable[0][1]
    return table.drop_columns(["_record"])


def dedup_token(event_ids: pa.Array) -> str:
    """Same events → same token: a batch inserted twice (redelivery) is stored once.

    sha256 of the number of ids, then each id's length in UTF-8 bytes, then the ids, all in
    sorted order (UTF-8 byte order is code point order); numbers as 8 bytes little-endian. The
    lengths say where each id ends, so ``["ab", "c"]`` and ``["a", "bc"]`` differ.
    """
    digest = hashlib.sha256(np.array([len(event_ids)], dtype="<u8").tobytes())
    if len(event_ids):
        ordered = pc.take(event_ids.cast(pa.string()), pc.array_sort_indices(event_ids))
        _, offsets_buffer, data = ordered.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=np.int32)
        offsets = offsets[ordered.offset : ordered.offset + len(ordered) + 1]
        digest.update(np.diff(offsets).astype("<u8").tobytes())
        digest.update(memoryview(data)[offsets[0] : offsets[-1]])
    return digest.hexdigest()


# --- one record's fault stays its own -------------------------------------------------------------


def _isolating(
    values: Sequence[bytes | None], positions: list[int]
) -> tuple[list[pa.Table], list[tuple[int, Exception]]]:
    """``_decode``; if it raises, each half again, so only the record at fault is refused."""
    try:
        return _decode(values, positions)
    except Exception as exc:
        if not positions:
            raise  # not a record's doing
        if len(positions) == 1:
            return [], [(positions[0], exc)]
    middle = len(positions) // 2
    left, left_refused = _isolating(values, positions[:middle])
    right, right_refused = _isolating(values, positions[middle:])
    return left + right, left_refused + right_refused


def _decode(
    values: Sequence[bytes | None], positions: list[int]
) -> tuple[list[pa.Table], list[tuple[int, Exception]]]:
    parts: list[pa.Table] = []
    slow: list[int] = []
    _fast(values, positions, parts, slow)
    refused: list[tuple[int, Exception]] = []
    events: list[AttemptEvent] = []
    at: list[int] = []
    for i in slow:
        try:
            event = AttemptEvent.model_validate_json(values[i] or b"")
        except Exception as exc:  # ValidationError, or whatever else the content provokes
            refused.append((i, exc))
            continue
        if misfit := _misfit(event):
            refused.append((i, misfit))
        else:
            events.append(event)
            at.append(i)
    if events:
        parts.append(_wide_from_events(events, at))
    wide = pa.concat_tables(parts) if parts else _WIDE_SCHEMA.empty_table()
    table, unstorable = _apply_store_limits(wide)
    return [table], refused + unstorable


# --- fast path ------------------------------------------------------------------------------------


def _fast(
    values: Sequence[bytes | None], positions: list[int], parts: list[pa.Table], slow: list[int]
) -> None:
    """Read ``positions`` with Arrow; halve on failure so one bad record costs log2(n) reads."""
    if not positions:
        return
    try:
        table, vouched = _read([values[i] or b"" for i in positions])
    except Exception:  # whatever Arrow makes of it: alone, the record is AttemptEvent's to judge
        if len(positions) == 1:
            slow.append(positions[0])
            return
        middle = len(positions) // 2
        _fast(values, positions[:middle], parts, slow)
        _fast(values, positions[middle:], parts, slow)
        return
    index = pa.array(positions, pa.int64())
    if pc.all(vouched).as_py():
        parts.append(table.append_column("_record", index))
        return
    parts.append(table.filter(vouched).append_column("_record", index.filter(vouched)))
    slow.extend(index.filter(pc.invert(vouched)).to_pylist())


def _read(chunk: list[bytes]) -> tuple[pa.Table, pa.ChunkedArray]:
    """One JSON object per line → wide-typed columns, and which rows the fast path vouches for."""
    data = b"\n".join(chunk)
    if not data.startswith(b"{") or data.count(b"\n{") != len(chunk) - 1 or b"\r" in data:
        raise _Unframed
    raw = pj.read_json(io.BytesIO(data), read_options=_READ_OPTIONS, parse_options=_PARSE_OPTIONS)
    if raw.num_rows != len(chunk):
        raise _Unframed
    # Arrow's reader keeps invalid UTF-8 in strings (AttemptEvent refuses it): this raises,
    # and halving hands the record to AttemptEvent
    raw.validate(full=True)
    vouched = _vouched(raw)
    # Parse timestamps only where the form is right; an impossible date (Feb 30) raises, and
    # halving hands that record to pydantic.
    ts = pc.if_else(vouched, raw.column("ts"), pa.scalar(None, pa.string()))
    columns: dict[str, Any] = {
        name: raw.column(name) for name in _WIDE_SCHEMA.names if name not in ("ts", "_record")
    }
    columns["ts"] = pc.cast(ts, _WIDE_TYPES["ts"])
    return pa.table({name: columns[name] for name in _WIDE_SCHEMA.names[:-1]}), vouched


def _vouched(raw: pa.Table) -> pa.ChunkedArray:
    """Rows whose every field is present, of the right form, and within AttemptEvent's rules."""
    checks = [pc.is_valid(raw.column(name)) for name in _READ_SCHEMA.names if name not in _NULLABLE]
    checks += [
        pc.equal(raw.column("schema_version"), SCHEMA_VERSION),
        pc.match_substring_regex(raw.column("ts"), _TS_FORM),
        pc.is_in(raw.column("status"), value_set=_STATUSES),
        pc.is_in(raw.column("variant"), value_set=_VARIANTS),
        pc.is_in(raw.column("cascade_step"), value_set=_STEPS),
        pc.is_in(raw.column("verdict"), value_set=_VERDICTS),
        pc.less_equal(pc.utf8_length(raw.column("verdict_reason")), 500),
        pc.less_equal(pc.utf8_length(raw.column("input_noise")), 100),
        pc.match_substring_regex(raw.column("input_noise"), INPUT_NOISE_FORM),
        pc.and_(
            pc.greater_equal(raw.column("share_pct"), 0),
            pc.less_equal(raw.column("share_pct"), 100),
        ),
        pc.less_equal(pc.utf8_length(raw.column("experiment")), 100),
        pc.greater_equal(raw.column("latency_ms"), 0),
        pc.greater_equal(raw.column("cost_usd"), 0),
        pc.fill_null(pc.greater_equal(raw.column("ttft_ms"), 0), True),  # may be null
        pc.fill_null(
            pc.and_(
                pc.greater_equal(raw.column("route_score"), 0),
                pc.less_equal(raw.column("route_score"), 1),
            ),
            True,
        ),
    ]
    # integers past their column go to AttemptEvent, which may refuse them itself
    checks += [
        pc.and_(pc.greater_equal(raw.column(name), low), pc.less_equal(raw.column(name), high))
        for name, (low, high, _) in _LIMITS.items()
        if name != "ts"
    ]
    ok = checks[0]
    for check in checks[1:]:
        ok = pc.and_kleene(ok, check)
    return pc.fill_null(ok, False)


# --- slow path and store limits -------------------------------------------------------------------


def _misfit(event: AttemptEvent) -> Unstorable | None:
    """An integer its column cannot hold, checked before Arrow (whose int64 it may overflow)."""
    for name in ("attempt", "tokens_in", "tokens_out", "retry", "context_window"):
        low, high, _ = _LIMITS[name]
        if not low <= getattr(event, name) <= high:
            return _unstorable(name, getattr(event, name))
    return None


def _unstorable(name: str, value: Any) -> Unstorable:
    return Unstorable(f"{name}: {value} does not fit the {_LIMITS[name][2]} column")


def _wide_from_events(events: Sequence[AttemptEvent], positions: Sequence[int]) -> pa.Table:
    columns = {
        name: pa.array([getattr(e, name) for e in events], type=_WIDE_SCHEMA.field(name).type)
        for name in COLUMNS
    }
    columns["_record"] = pa.array(positions, pa.int64())
    return pa.table(columns, schema=_WIDE_SCHEMA)


def _apply_store_limits(wide: pa.Table) -> tuple[pa.Table, list[tuple[int, Exception]]]:
    """Drop (and explain) rows whose values the ClickHouse columns cannot hold; cast the rest."""
    fits = {
        name: pc.and_(
            pc.greater_equal(wide.column(name), low), pc.less_equal(wide.column(name), high)
        )
        for name, (low, high, _) in _LIMITS.items()
    }
    ok = fits["attempt"]
    for name in ("tokens_in", "tokens_out", "retry", "context_window", "ts"):
        ok = pc.and_(ok, fits[name])
    ok = pc.fill_null(ok, False)
    refused: list[tuple[int, Exception]] = []
    if not pc.all(ok).as_py():
        bad = wide.filter(pc.invert(ok))
        for row in bad.to_pylist():
            name = next(
                n for n, (lo, hi, _) in _LIMITS.items() if row[n] is None or not lo <= row[n] <= hi
            )
            refused.append((row["_record"], _unstorable(name, row[name])))
        wide = wide.filter(ok)
    return wide.cast(_STORED_SCHEMA, safe=False), refused
