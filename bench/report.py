"""Scenario ``report``: a 7-day decision matrix over llm_events against llm_events_1m.

A fresh chDB store is filled with a week of synthetic attempts (Arrow batches through
``ClickHouseStore.insert_table``, as the writer inserts, so the materialized view fills the
per-minute aggregate on the way), both tables are merged (``OPTIMIZE FINAL``: a store that has
settled), and the same per tier, model, variant and config figures are timed side by side:

* over llm_events with the exact functions the report uses (uniqExact, quantileExact);
* over llm_events with the approximate ones (uniq, quantilesTDigest), which tells the gain of
  reading fewer rows apart from the gain of cheaper functions;
* over llm_events_1m with the -Merge functions.

Queries alternate, ``REPEATS`` times each after one uncounted run, and the medians are reported.
The store runs in a child process: chDB lets a process open one data directory.

    python -m bench.report <data dir> <rows> <repeats>   # the child; prints JSON
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from bench.common import ROOT, Bench, Section
from services.metrics.domain.columns import TABLE_SCHEMA

DAYS = 7
BATCH = 500_000
REPEATS = 5
# tier → (models, primary first; experiment variants)
TIERS = {
    "fast": (("sim-light", "sim-balanced"), ("baseline", "candidate")),
    "balanced": (("sim-balanced", "sim-light"), ("",)),
    "reasoning": (("sim-reasoning", "sim-balanced"), ("",)),
    "vision": (("sim-vision",), ("",)),
}
CONFIGS = ("c0ffee01", "c0ffee02", "c0ffee03")  # the config changed twice in the week
KEYS = "tier, model, variant, config_hash"

RAW_EXACT = f"""
SELECT {KEYS},
    uniqExact(request_id) AS n_requests, count() AS n_attempts,
    countIf(status != 'ok') / count() AS error_rate,
    quantilesExactIf(0.5, 0.95, 0.99)(latency_ms, status = 'ok') AS latency_q,
    quantileExactIf(0.5)(ttft_ms, status = 'ok' AND ttft_ms IS NOT NULL) AS ttft_p50,
    sum(tokens_in) AS in_tokens, sum(tokens_out) AS out_tokens, sum(cost_usd) AS usd
FROM {{db}}.llm_events
WHERE ts >= now64(3) - toIntervalDay({DAYS})
GROUP BY {KEYS} ORDER BY {KEYS}
"""
RAW_APPROXIMATE = (
    RAW_EXACT.replace("uniqExact(", "uniq(")
    .replace("quantilesExactIf(", "quantilesTDigestIf(")
    .replace("quantileExactIf(", "quantileTDigestIf(")
)
# aliases differ from the aggregate's column names: ``sum(attempts) AS attempts`` would make
# every later ``attempts`` the sum, and ClickHouse refuses an aggregate inside another
AGGREGATE = f"""
SELECT {KEYS},
    uniqMerge(requests) AS n_requests, sum(attempts) AS n_attempts,
    sum(errors) / sum(attempts) AS error_rate,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_ms) AS latency_q,
    quantileTDigestMerge(0.5)(ttft_ms) AS ttft_p50,
    sum(tokens_in) AS in_tokens, sum(tokens_out) AS out_tokens, sum(cost_usd) AS usd
FROM {{db}}.llm_events_1m
WHERE minute >= toStartOfMinute(now() - toIntervalDay({DAYS}))
GROUP BY {KEYS} ORDER BY {KEYS}
"""
QUERIES = {"raw_exact": RAW_EXACT, "raw_approximate": RAW_APPROXIMATE, "aggregate": AGGREGATE}


def synthetic_week(rows: int, seed: int, start: int, now: datetime) -> pa.Table:
    """``rows`` attempts spread evenly over the last ``DAYS`` days (a little under, so none has
    expired), shaped as ``TABLE_SCHEMA``; ids from ``start`` on."""
    rng = np.random.default_rng(seed)
    span_ms = (DAYS * 86_400 - 600) * 1000
    ago = rng.integers(0, span_ms, rows)
    ts = np.datetime64(now.replace(tzinfo=None), "ms") - ago.astype("timedelta64[ms]")
    tier_names = np.array(list(TIERS))
    tier_at = rng.choice(len(TIERS), rows, p=[0.5, 0.3, 0.1, 0.1])
    fallback = rng.random(rows) < 0.08
    model = np.empty(rows, dtype=object)
    variant = np.empty(rows, dtype=object)
    for i, (models, variants) in enumerate(TIERS.values()):
        here = tier_at == i
        pick = np.where(fallback[here] & (len(models) > 1), len(models) - 1, 0)
        model[here] = np.array(models, dtype=object)[pick]
        variant[here] = np.array(variants, dtype=object)[rng.integers(0, len(variants), here.sum())]
    config = np.array(CONFIGS)[np.minimum(((span_ms - ago) * len(CONFIGS)) // span_ms, 2)]
    ok = rng.random(rows) < 0.95
    latency = rng.lognormal(6.0, 0.6, rows)
    ttft = np.where(rng.random(rows) < 0.6, latency * 0.3, np.nan)
    tokens_in = rng.integers(20, 6_000, rows)
    ids = np.arange(start, start + rows)
    columns: dict[str, Any] = {name: np.full(rows, "", dtype=object) for name in TABLE_SCHEMA.names}
    columns |= {
        "ts": ts,
        "event_id": np.char.add("e", ids.astype(str)),
        "request_id": np.char.add("r", (ids // 2).astype(str)),
        "tier": tier_names[tier_at],
        "model": model,
        "provider": np.full(rows, "openai", dtype=object),
        "rule": np.where(fallback, "fallback:error", "default"),
        "config_hash": config,
        "attempt": fallback.astype(np.uint16),
        "status": np.where(ok, "ok", "error"),
        "tokens_in": tokens_in.astype(np.uint32),
        "tokens_out": rng.integers(1, 800, rows).astype(np.uint32),
        "latency_ms": latency,
        "ttft_ms": pa.array(ttft, from_pandas=True),
        "cost_usd": tokens_in * 2e-7,
        "share_pct": np.where(variant != "", 10.0, 0.0),
        "route_score": pa.nulls(rows, pa.float64()),
        "variant": variant,
        "retry": np.zeros(rows, dtype=np.uint16),
        "input_noise": np.where(rng.random(rows) < 0.03, "tagged", ""),
        "context_window": np.full(rows, 128_000, dtype=np.uint32),
    }
    return pa.table(
        {n: pa.array(columns[n], type=TABLE_SCHEMA.field(n).type) for n in TABLE_SCHEMA.names}
    )


async def _measure(data_dir: str, rows: int, repeats: int) -> dict[str, Any]:
    from services.metrics.adapters.store import ClickHouseStore

    store = ClickHouseStore("chdb://" + data_dir, "switchboard")
    client: Any = None

    def sql(text: str) -> list[Any]:
        return list(client.query(text.replace("{db}", "switchboard")).result_rows)

    try:
        await store.migrate()
        client = await store._run(store._connect)  # the store's thread owns the directory
        now = datetime.now(UTC)
        started = time.perf_counter()
        for n, start in enumerate(range(0, rows, BATCH)):
            batch = synthetic_week(min(BATCH, rows - start), n, start, now)
            await store.insert_table(batch, f"bench-report-{n}")
        fill_s = time.perf_counter() - started
        started = time.perf_counter()
        for table in ("llm_events", "llm_events_1m"):
            await store._run(client.command, f"OPTIMIZE TABLE switchboard.{table} FINAL")
        optimize_s = time.perf_counter() - started
        counts = {
            table: (await store._run(sql, f"SELECT count() FROM switchboard.{table}"))[0][0]
            for table in ("llm_events", "llm_events_1m")
        }
        timings: dict[str, list[float]] = {k: [] for k in QUERIES}
        answers: dict[str, list[Any]] = {}
        for round_ in range(repeats + 1):
            for key, text in QUERIES.items():
                t0 = time.perf_counter()
                answers[key] = await store._run(sql, text)
                if round_:  # the first is uncounted
                    timings[key].append((time.perf_counter() - t0) * 1000)
    finally:
        await store.close()
    exact, rolled = answers["raw_exact"], answers["aggregate"]
    return {
        "rows": rows,
        "aggregate_rows": counts["llm_events_1m"],
        "raw_rows": counts["llm_events"],
        "groups": len(exact),
        "fill_s": round(fill_s, 1),
        "fill_rows_per_s": round(rows / fill_s),
        "optimize_s": round(optimize_s, 1),
        "repeats": repeats,
        "median_ms": {k: round(statistics.median(v), 1) for k, v in timings.items()},
        "attempts_equal": [r[5] for r in exact] == [r[5] for r in rolled],
        "worst_p95_gap_pct": round(
            max(abs(a[7][1] - e[7][1]) / e[7][1] * 100 for e, a in zip(exact, rolled, strict=True)),
            2,
        ),
    }


def run(bench: Bench) -> Section:
    rows = bench.scale(3_000_000, 20_000)
    data_dir = tempfile.mkdtemp(prefix="report-", dir=bench.work_dir)
    out = subprocess.run(
        [sys.executable, "-m", "bench.report", data_dir, str(rows), str(bench.scale(REPEATS, 1))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=1200,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return Section(key="report", data=data, markdown=_markdown(data))


def _markdown(d: dict[str, Any]) -> str:
    ms = d["median_ms"]
    lines = [
        f"### Report: a {DAYS}-day decision matrix, raw events vs the per-minute aggregate",
        "",
        f"{d['rows']:,} synthetic attempts over {DAYS} days ({d['groups']} tier / model / variant"
        f" / config groups) inserted as Arrow batches of {BATCH:,} in {d['fill_s']} s "
        f"({d['fill_rows_per_s']:,} rows/s, the materialized view included), then both tables "
        f"merged (OPTIMIZE FINAL, {d['optimize_s']} s). Median of {d['repeats']} runs each, "
        "alternating, after one uncounted:",
        "",
        "| query | rows read | median |",
        "|---|---:|---:|",
        f"| llm_events, exact (uniqExact, quantileExact) | {d['raw_rows']:,} "
        f"| {ms['raw_exact']} ms |",
        f"| llm_events, approximate (uniq, quantilesTDigest) | {d['raw_rows']:,} "
        f"| {ms['raw_approximate']} ms |",
        f"| llm_events_1m (-Merge) | {d['aggregate_rows']:,} | {ms['aggregate']} ms |",
        "",
        f"Attempts per group equal in both: {d['attempts_equal']}; the largest p95 latency gap "
        f"(t-digest against exact) over the groups: {d['worst_p95_gap_pct']} %.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    directory, count, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(_measure(directory, count, repeat))))
