"""The report's SQL runs on the real engine (chDB) over known rows and gives the known answer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from schemas.v1 import AttemptEvent
from services.metrics.adapters.store import ClickHouseStore
from services.metrics.domain.report import REPORT_COLUMNS, decision_matrix_sql


def event(request_id: str, model: str, status: str, latency: float, cost: float) -> AttemptEvent:
    return AttemptEvent(
        ts=datetime.now(UTC),
        request_id=request_id,
        tier="fast",
        model=model,
        provider="openai",
        rule="short",
        config_hash="h",
        attempt=0,
        status=status,
        tokens_in=100,
        tokens_out=100,
        latency_ms=latency,
        ttft_ms=latency / 2,
        cost_usd=cost,
    )


def test_decision_matrix(chdb_data_dir: Path) -> None:
    async def go() -> tuple[list[str], list[list[object]]]:
        store = ClickHouseStore(f"chdb://{chdb_data_dir}", "report_test")
        try:
            await store.migrate()
            await store.insert(
                [event(f"r{i}", "m1", "ok", float(i), 0.001) for i in range(1, 101)]
                + [event("x", "m2", "error", 5.0, 0.0), event("x", "m2", "ok", 50.0, 0.002)]
            )
            return await store.query(decision_matrix_sql("report_test.llm_events", 1))
        finally:
            await store.close()

    columns, rows = asyncio.run(go())
    assert tuple(columns) == REPORT_COLUMNS
    m1, m2 = (dict(zip(columns, r, strict=True)) for r in rows)
    assert (m1["model"], m1["requests"], m1["attempts"], m1["error_rate"]) == ("m1", 100, 100, 0)
    assert (m1["p50_ms"], m1["p95_ms"], m1["p99_ms"]) == (
        51.0,
        96.0,
        100.0,
    )  # quantileExact: the value at index floor(level * n)
    assert abs(m1["usd_per_1k_tokens"] - 0.005) < 1e-9  # 0.1 USD over 20k tokens
    assert (m2["requests"], m2["attempts"], m2["error_rate"], m2["p50_ms"]) == (1, 2, 0.5, 50.0)
