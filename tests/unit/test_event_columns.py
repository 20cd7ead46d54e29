"""Event records → rows: the Arrow fast path stores exactly what AttemptEvent accepts."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from pydantic import ValidationError

from schemas.v1 import AttemptEvent
from services.metrics.domain import columns
from services.metrics.domain.columns import (
    TABLE_SCHEMA,
    Unstorable,
    decode,
    dedup_token,
    events_table,
)

GOLDEN = AttemptEvent(
    event_id="e" * 32,
    ts=datetime(2026, 3, 1, 12, 30, 45, 123456, tzinfo=UTC),
    request_id="sbr-1",
    tier="fast",
    model="sim-light",
    provider="openai",
    rule="short",
    config_hash="0123456789abcdef",
    attempt=0,
    status="ok",
    tokens_in=120,
    tokens_out=30,
    latency_ms=812.5,
    ttft_ms=101.25,
    cost_usd=0.0000123,
    response_sha256="f" * 64,
    tenant_hash="a" * 32,
)
BASE: dict[str, Any] = json.loads(GOLDEN.model_dump_json())


def variant(**changes: Any) -> bytes:
    body = {**BASE, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


# (payload, compare event_id and ts?) — every case goes through both paths.
CASES: dict[str, tuple[bytes | None, bool]] = {
    "as a worker writes it": (GOLDEN.model_dump_json().encode(), True),
    "no ttft": (variant(ttft_ms=None), True),
    "offset timestamp": (variant(ts="2026-03-01T14:30:45.5+02:00"), True),
    "no fraction": (variant(ts="2026-03-01T12:30:45Z"), True),
    "naive timestamp": (variant(ts="2026-03-01T12:30:45"), True),
    "unknown fields": (variant(extra={"nested": [1, 2]}, more="x"), True),
    "pretty printed": (json.dumps(BASE, indent=2).encode(), True),
    "leading space": (b"  " + GOLDEN.model_dump_json().encode(), True),
    "integral float attempt": (variant(attempt=1.0), True),
    "numeric string tokens": (variant(tokens_in="5"), True),
    "missing defaults": (variant(error_code=..., tokens_out=..., schema_version=...), True),
    "duplicate key": (b'{"tier": "x", ' + GOLDEN.model_dump_json().encode()[1:], True),
    "escaped key": (GOLDEN.model_dump_json().encode().replace(b'"tier"', b'"t\\u0069er"'), True),
    "no event id": (variant(event_id=...), False),
    "no ts": (variant(ts=...), False),
    "null default": (variant(error_code=None), True),
    "bad status": (variant(status="bogus"), True),
    "negative latency": (variant(latency_ms=-1), True),
    "negative attempt": (variant(attempt=-1), True),
    "fractional attempt": (variant(attempt=1.5), True),
    "schema version 2": (variant(schema_version=2), True),
    "string number": (variant(request_id=5), True),
    "no tier": (variant(tier=...), True),
    "february 30": (variant(ts="2026-02-30T00:00:00Z"), True),
    "7 fraction digits": (variant(ts="2026-03-01T12:30:45.1234567Z"), True),
    "lone surrogate": (
        GOLDEN.model_dump_json().encode().replace(b'"sim-light"', b'"\\ud800"'),
        True,
    ),
    "two objects": (GOLDEN.model_dump_json().encode() * 2, True),
    "not json": (b"{nope", True),
    "empty": (b"", True),
    "tombstone": (None, True),
    "an array": (b"[1]", True),
    "negative tokens": (variant(tokens_in=-3), True),
    "tokens past UInt32": (variant(tokens_out=2**32), True),
    "attempt past UInt16": (variant(attempt=70_000), True),
    "year 2400": (variant(ts="2400-01-01T00:00:00Z"), True),
}


def expected(payload: bytes | None) -> tuple[dict[str, Any] | None, type[Exception] | None]:
    """What pydantic (the authority) and the store's column types make of one record."""
    try:
        event = AttemptEvent.model_validate_json(payload or b"")
    except ValidationError:
        return None, ValidationError
    try:
        return events_table([event]).to_pylist()[0], None
    except Unstorable:
        return None, Unstorable


def comparable(row: dict[str, Any], exact: bool) -> dict[str, Any]:
    return row if exact else {k: v for k, v in row.items() if k not in ("event_id", "ts")}


@pytest.mark.parametrize("name", list(CASES))
def test_alone_and_amid_good_records_a_record_is_stored_as_pydantic_would(name: str) -> None:
    payload, exact = CASES[name]
    row, error = expected(payload)
    good = GOLDEN.model_dump_json().encode()
    good_row = events_table([GOLDEN]).to_pylist()[0]
    for batch, at in (([payload], 0), ([good] * 40 + [payload] + [good] * 23, 40)):
        decoded = decode(batch)
        assert decoded.table.schema == TABLE_SCHEMA
        refused = dict(decoded.refused)
        if error is None:
            assert at not in refused
            rows = decoded.table.to_pylist()
            assert len(rows) == len(batch)
            others = [r for r in rows if r != good_row]  # the record under test, unless equal
            assert len(others) <= 1
            assert comparable(others[0] if others else good_row, exact) == comparable(
                row or {}, exact
            )
        else:
            assert isinstance(refused[at], error), refused[at]
            assert decoded.table.num_rows == len(batch) - 1
            assert set(refused) == {at}


def test_records_as_workers_write_them_never_reach_pydantic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    class Counting(AttemptEvent):
        @classmethod
        def model_validate_json(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            calls.append(1)
            return super().model_validate_json(*args, **kwargs)

    monkeypatch.setattr(columns, "AttemptEvent", Counting)
    events = [
        GOLDEN.model_copy(update={"event_id": f"{i:032x}", "attempt": i % 3}) for i in range(500)
    ]
    decoded = decode([e.model_dump_json().encode() for e in events])
    assert decoded.table.num_rows == 500 and not decoded.refused and not calls
    assert decoded.table.to_pylist() == events_table(events).to_pylist()


def test_dedup_token_is_the_sorted_ids_hashed() -> None:
    ids = ["b", "a", "é", "zz", "", "ab"]
    digest = hashlib.sha256()
    for event_id in sorted(ids):
        digest.update(event_id.encode())
    assert dedup_token(pa.array(ids)) == digest.hexdigest()
    assert dedup_token(pa.array(ids).slice(2, 3)) == hashlib.sha256("zzé".encode()).hexdigest()
    assert dedup_token(pa.array([], pa.string())) == hashlib.sha256().hexdigest()
