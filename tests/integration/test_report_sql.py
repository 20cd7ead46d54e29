"""The report's SQL runs on the real engine (chDB) over known rows and gives the known answer,
from llm_events and from the per-minute aggregate alike."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.v1 import AttemptEvent
from services.metrics.adapters.store import ClickHouseStore
from services.metrics.domain import report
from services.metrics.domain.report import Window


def event(request_id: str, model: str, status: str, latency: float, **more: object) -> AttemptEvent:
    fields: dict[str, object] = {
        "ts": datetime.now(UTC) - timedelta(minutes=5),
        "request_id": request_id,
        "tier": "fast",
        "model": model,
        "provider": "openai",
        "rule": "short",
        "config_hash": "h",
        "attempt": 0,
        "status": status,
        "tokens_in": 100,
        "tokens_out": 100,
        "latency_ms": latency,
        "cost_usd": 0.001 if status == "ok" else 0.0,
    }
    return AttemptEvent.model_validate(fields | more)


def rows(db: str) -> list[AttemptEvent]:
    m1 = [
        event(f"r{i}", "m1", "ok", float(i), ttft_ms=i / 2, context_window=1000, tokens_in=i * 10)
        for i in range(1, 101)
    ]
    # m2: a request that failed on m1's neighbour and fell back; one noisy error; no window
    m2 = [
        event("x", "m2", "error", 5.0, input_noise="garbled"),
        event("x", "m2", "ok", 50.0, attempt=1, retry=1, input_noise="garbled"),
        event("y", "m2", "ok", 70.0, attempt=2, retry=0),
    ]
    return m1 + m2


@pytest.fixture(scope="module")
def answers(chdb_data_dir: Path) -> dict[str, dict[str, dict[str, object]]]:
    db = f"report_{uuid.uuid4().hex[:8]}"
    window = Window.last(1)

    async def go() -> dict[str, dict[str, dict[str, object]]]:
        store = ClickHouseStore(f"chdb://{chdb_data_dir}", db)
        try:
            await store.migrate()
            await store.insert(rows(db))
            out = {}
            for source in ("events", "aggregate"):
                asked = report.queries(db, window, source, charts=True)  # type: ignore[arg-type]
                results = {name: await store.query(sql) for name, sql in asked.items()}
                found = report.assemble(window, source, results)  # type: ignore[arg-type]
                out[source] = {r["model"]: r for r in found.matrix}
                assert set(found.cdf) == {"m1", "m2"} and set(found.series) == {"m1", "m2"}
                bins = [min(math.floor(i * 10 / 1000 * 20), 19) for i in range(1, 101)]
                assert found.window_use == {"m1": [bins.count(b) for b in range(20)]}
            return out
        finally:
            await store.close()

    return asyncio.run(go())


def test_exact_figures_from_events(answers: dict[str, dict[str, dict[str, object]]]) -> None:
    m1, m2 = answers["events"]["m1"], answers["events"]["m2"]
    assert (m1["requests"], m1["attempts"], m1["error_rate"]) == (100, 100, 0)
    # quantileExact: the value at index floor(level * n)
    assert (m1["p50_ms"], m1["p95_ms"], m1["p99_ms"]) == (51.0, 96.0, 100.0)
    assert (m1["ttft_p50_ms"], m1["window_use_max"]) == (25.5, 1.0)
    assert m1["window_use_p50"] == 0.51 and m1["notes"] == "noisy: no noisy input"
    assert m1["usd_per_1k_tokens"] == round(0.1 * 1000 / (50500 + 10000), 6)
    assert (m2["requests"], m2["attempts"], m2["error_rate"], m2["p50_ms"]) == (2, 3, 0.3333, 70.0)
    assert (m2["noisy_attempts"], m2["noisy_error_rate"]) == (2, 0.5)
    assert m2["fallback_rate"] == 0.5  # y reached m2 after another model; x's try 2 is a retry
    assert m2["notes"] == "ttft: no streamed call succeeded; window: context window unknown"


def test_aggregate_agrees(answers: dict[str, dict[str, dict[str, object]]]) -> None:
    """Counts and sums equal; quantiles within the t-digest's error."""
    exact, merged = answers["events"], answers["aggregate"]
    assert set(exact) == set(merged)
    for model, row in exact.items():
        other = merged[model]
        for column in report.MATRIX_COLUMNS:
            mine, theirs = row[column], other[column]
            if column.startswith(("p", "ttft_", "window_use_p")) and isinstance(mine, float):
                # t-digest interpolates: on m2's two values its median is one of them, not the
                # exact one's; on m1's hundred it is within a few percent
                if row["attempts"] >= 100:
                    assert isinstance(theirs, float), column
                    assert abs(theirs - mine) <= 0.05 * mine + 1, column
            else:
                assert theirs == mine, (model, column)
