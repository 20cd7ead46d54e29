"""Event records → rows: the Arrow fast path stores exactly what AttemptEvent accepts."""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
    "in an experiment": (variant(experiment="next", variant="candidate", share_pct=25.0), True),
    "written before experiments": (variant(experiment=..., variant=..., share_pct=...), True),
    "unknown variant": (variant(experiment="next", variant="shadowy", share_pct=5.0), True),
    "share past 100": (variant(experiment="next", variant="baseline", share_pct=100.5), True),
    "integral share": (variant(experiment="next", variant="baseline", share_pct=5), True),
    "experiment name too long": (variant(experiment="x" * 101), True),
}


def expected(payload: bytes | None) -> tuple[dict[str, Any] | None, type[Exception] | None]:
    """What pydantic (the authority) and the store's column types make of one record."""
    try:
        event = AttemptEvent.model_validate_json(payload or b"")
    except ValidationError:
        return None, ValidationError
    except Exception as exc:  # anything else pydantic raises also refuses the record
        return None, type(exc)
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


def reference_token(ids: list[str]) -> str:
    """``dedup_token`` written plainly: count, each length, then the ids, in UTF-8 byte order."""
    encoded = sorted(i.encode() for i in ids)
    digest = hashlib.sha256(struct.pack("<Q", len(encoded)))
    for event_id in encoded:
        digest.update(struct.pack("<Q", len(event_id)))
    for event_id in encoded:
        digest.update(event_id)
    return digest.hexdigest()


def test_dedup_token_is_the_sorted_ids_hashed_with_their_lengths() -> None:
    ids = ["b", "a", "é", "zz", "", "ab"]
    assert dedup_token(pa.array(ids)) == reference_token(ids)
    assert dedup_token(pa.array(ids).slice(2, 3)) == reference_token(["é", "zz", ""])
    assert dedup_token(pa.array([], pa.string())) == reference_token([])
    assert dedup_token(pa.array(ids, pa.large_string())) == reference_token(ids)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (["ab", "c"], ["a", "bc"]),
        (["abc"], ["a", "bc"]),
        (["a", ""], ["a"]),
        (["", ""], [""]),
        ([], [""]),
    ],
)
def test_dedup_tokens_of_different_id_lists_differ(one: list[str], other: list[str]) -> None:
    assert dedup_token(pa.array(one, pa.string())) != dedup_token(pa.array(other, pa.string()))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=6), max_size=8), st.lists(st.text(max_size=6), max_size=8))
def test_dedup_tokens_are_equal_exactly_for_the_same_ids_in_any_order(
    one: list[str], other: list[str]
) -> None:
    same = sorted(i.encode() for i in one) == sorted(i.encode() for i in other)
    tokens = dedup_token(pa.array(one, pa.string())), dedup_token(pa.array(other, pa.string()))
    assert (tokens[0] == tokens[1]) == same
    assert tokens[0] == reference_token(one)


# --- no record stalls the writer: every record ends as a row or a refusal -------------------------

# Values no field of AttemptEvent takes as they are, at the edges of what JSON, Arrow and the
# columns can hold.
EDGE_VALUES: dict[str, Any] = {
    "2**63": 2**63,
    "2**64": 2**64,
    "-2**63 - 1": -(2**63) - 1,
    "10**40": 10**40,
    "UInt32 max": 2**32 - 1,
    "UInt16 max + 1": 2**16,
    "1e308": 1e308,
    "-0.0": -0.0,
    "tiny float": 5e-324,
    "long string": "x" * 100_000,
    "nested": {"a": [[[[{"b": None}]]]]},
    "empty object": {},
    "true": True,
}
EDGE_FIELDS = ["attempt", "tokens_in", "tokens_out", "latency_ms", "ttft_ms", "cost_usd", "tier"]


def golden_with(old: bytes, new: bytes) -> bytes:
    return GOLDEN.model_dump_json().encode().replace(old, new, 1)


RAW_EDGES: dict[str, bytes] = {
    "float past double": golden_with(b'"latency_ms":812.5', b'"latency_ms":1e400'),
    "NaN literal": golden_with(b'"latency_ms":812.5', b'"latency_ms":NaN'),
    "integer as exponent": golden_with(b'"tokens_in":120', b'"tokens_in":1e30'),
    "not UTF-8": golden_with(b"sim-light", b"sim-\xff\xfe"),
    "truncated UTF-8": golden_with(b"sim-light", b"sim-\xc3\x28"),
    "deep nesting": variant(extra=json.loads("[" * 200 + "]" * 200)),
    "deeper than parsers go": b'{"extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "NUL byte first": b"\x00" + GOLDEN.model_dump_json().encode(),
    "newline inside": golden_with(b",", b",\n"),
    "a number": b"12",
    "a string": b'"hello"',
}


def every_record_has_one_outcome(batch: list[bytes | None]) -> columns.Decoded:
    decoded = decode(batch)
    refused = [i for i, _ in decoded.refused]
    assert decoded.table.schema == TABLE_SCHEMA
    assert len(refused) == len(set(refused))
    assert sorted(refused + decoded.positions.to_pylist()) == list(range(len(batch)))
    return decoded


@pytest.mark.parametrize("value", list(EDGE_VALUES))
@pytest.mark.parametrize("name", EDGE_FIELDS)
def test_an_edge_value_in_any_field_makes_a_row_or_a_refusal(name: str, value: str) -> None:
    payload = variant(**{name: EDGE_VALUES[value]})
    good = GOLDEN.model_dump_json().encode()
    row, error = expected(payload)
    for batch, at in (([payload], 0), ([good] * 5 + [payload] + [good] * 4, 5)):
        decoded = every_record_has_one_outcome(batch)
        refused = dict(decoded.refused)
        assert (at in refused) == (row is None), refused.get(at)
        if error is not None:
            assert isinstance(refused[at], error), refused[at]
        else:
            stored = decoded.table.filter(pc.equal(decoded.positions, at)).to_pylist()
            assert stored == [row]


@pytest.mark.parametrize("name", list(RAW_EDGES))
def test_odd_bytes_make_a_row_or_a_refusal(name: str) -> None:
    good = GOLDEN.model_dump_json().encode()
    row, _ = expected(RAW_EDGES[name])
    for batch, at in (([RAW_EDGES[name]], 0), ([good, RAW_EDGES[name], good, None, b"", good], 1)):
        decoded = every_record_has_one_outcome(batch)
        assert (at in dict(decoded.refused)) == (row is None)


class Boom(Exception):
    """What no step foresaw."""


def test_an_error_no_step_foresaw_refuses_only_its_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever raises while one record is decoded (here, building its Arrow row), that record
    is refused with the error and the others are stored."""
    wide_from_events = columns._wide_from_events

    def failing(events: Any, positions: Any) -> pa.Table:
        if any(e.request_id == "poison" for e in events):
            raise Boom("cannot convert")
        return wide_from_events(events, positions)

    monkeypatch.setattr(columns, "_wide_from_events", failing)
    good = [variant(request_id=f"r{i}", attempt=1.0) for i in range(9)]  # slow path, all of them
    batch = [*good[:4], variant(request_id="poison", attempt=1.0), *good[4:]]
    decoded = every_record_has_one_outcome(batch)
    assert [(i, type(e)) for i, e in decoded.refused] == [(4, Boom)]
    assert sorted(r["request_id"] for r in decoded.table.to_pylist()) == [f"r{i}" for i in range(9)]


@pytest.mark.parametrize("error", [TypeError("odd"), OverflowError("big"), RecursionError()])
def test_any_error_from_the_schema_refuses_the_record(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    class Raising(AttemptEvent):
        @classmethod
        def model_validate_json(cls, data: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            if b"poison" in data:
                raise error
            return super().model_validate_json(data, *args, **kwargs)

    monkeypatch.setattr(columns, "AttemptEvent", Raising)
    batch = [variant(request_id="fine", attempt=1.0), variant(request_id="poison", attempt=1.0)]
    decoded = every_record_has_one_outcome(batch)
    assert decoded.refused == [(1, error)]
    assert [r["request_id"] for r in decoded.table.to_pylist()] == ["fine"]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["ok", "error", "2026-03-01T12:30:45Z", "2026-03-01T12:30:45.123+02:00"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
RECORDS = st.one_of(
    # a valid event with some fields replaced by anything, or left out
    st.dictionaries(st.sampled_from(sorted(BASE)), JSON_VALUES | st.just(...), max_size=6).map(
        lambda changes: variant(**changes)
    ),
    # a valid event with raw bytes inside one of its strings (invalid UTF-8, control bytes)
    st.binary(max_size=8).map(
        lambda raw: golden_with(b"sim-light", raw.replace(b'"', b"").replace(b"\\", b""))
    ),
    st.binary(max_size=40),
    st.none(),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORDS, min_size=1, max_size=6))
def test_any_batch_decodes_to_rows_and_refusals_as_pydantic_would(
    batch: list[bytes | None],
) -> None:
    decoded = every_record_has_one_outcome(batch)
    refused = dict(decoded.refused)
    rows = decoded.table.to_pylist()
    for i, payload in enumerate(batch):
        row, _ = expected(payload)
        if row is None:
            assert i in refused
        else:
            assert i not in refused, refused[i]
            exact = has_id_and_ts(payload)
            stored = rows[decoded.positions.to_pylist().index(i)]
            assert comparable(stored, exact) == comparable(row, exact)


def has_id_and_ts(payload: bytes | None) -> bool:
    """Whether the record sets event_id and ts itself (else pydantic makes them up, anew each time)."""
    try:
        body = json.loads(payload or b"")
    except ValueError:
        return False
    return isinstance(body, dict) and "event_id" in body and "ts" in body
