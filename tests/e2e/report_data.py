"""Fills a fresh chDB store with an hour of known traffic for the report page's test:
``python -m tests.e2e.report_data DATA_DIR``.

Three models on two tiers, a canary (baseline and candidate on ``fast``, and the controller's
decisions), streamed calls on ``fast`` only (TTFT), noisy inputs, known context windows and a few errors.
Written through the metrics service's own store, so the rows are what it would write."""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.topics import DECISIONS_TABLE
from schemas.v1 import AttemptEvent
from services.metrics.adapters.store import ClickHouseStore

# model → (tier, variant, median latency ms, error share, context window, USD per token)
MODELS = {
    "sim-light": ("fast", "baseline", 120.0, 0.02, 128_000, 2e-7),
    "sim-light-next": ("fast", "candidate", 90.0, 0.05, 128_000, 1.5e-7),
    "sim-reasoning": ("reasoning", "", 2400.0, 0.01, 200_000, 1.5e-5),
}
CALLS = 400  # per model
DECISIONS = [  # (minutes before now, action, share from, share to)
    (55, "start", 0.0, 5.0),
    (40, "promote", 5.0, 25.0),
    (25, "promote", 25.0, 50.0),
    (10, "rollback", 50.0, 0.0),
]


def events(now: datetime) -> list[AttemptEvent]:
    rng = random.Random(16)
    rows = []
    for model, (tier, variant, median, errors, window, price) in MODELS.items():
        for i in range(CALLS):
            ok = rng.random() >= errors
            tokens_in = int(rng.lognormvariate(6.5, 1.2)) + 10
            tokens_out = 0 if not ok else rng.randint(20, 600)
            latency = rng.lognormvariate(0, 0.5) * median
            rows.append(
                AttemptEvent(
                    ts=now - timedelta(seconds=rng.uniform(5, 3600)),
                    request_id=uuid.uuid4().hex,
                    tier=tier,
                    model=model,
                    provider="openai",
                    rule="short",
                    config_hash="cfg-1",
                    attempt=0,
                    status="ok" if ok else "timeout",
                    error_code="" if ok else "timeout",
                    tokens_in=tokens_in,
                    tokens_out=tokens_out,
                    latency_ms=latency,
                    ttft_ms=latency * 0.3 if ok and i % 2 and tier == "fast" else None,
                    cost_usd=(tokens_in + tokens_out) * price,
                    experiment="fast-canary" if variant else "",
                    variant=variant,  # type: ignore[arg-type]
                    share_pct=25.0 if variant else 0.0,
                    input_noise="truncated" if i % 10 == 0 else "",
                    context_window=window,
                )
            )
    return rows


async def fill(data_dir: Path) -> None:
    now = datetime.now(UTC)
    store = ClickHouseStore(f"chdb://{data_dir / 'chdb'}", "switchboard")
    try:
        await store.migrate()
        await store.insert(events(now))
        columns = [
            *("decided_at", "decision_id", "experiment", "tier", "candidate", "action"),
            *("share_from", "share_to", "reason", "criteria", "figures", "by", "config_hash"),
        ]
        rows = [
            [
                *(now - timedelta(minutes=ago), uuid.uuid4().hex, "fast-canary", "fast"),
                *("sim-light-next", action, before, after, f"{action} by the test data", []),
                *("{}", "controller", "cfg-1"),
            ]
            for ago, action, before, after in DECISIONS
        ]
        await store.insert_rows(DECISIONS_TABLE, columns, rows, token=uuid.uuid4().hex)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(fill(Path(sys.argv[1])))
