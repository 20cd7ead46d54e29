"""Scenario 4, metrics ingest: events topic → ClickHouse (chDB) through ONE metrics process.

The events topic is filled with ``N`` realistic ``AttemptEvent`` messages before the metrics writer
starts. Progress is the consumer group's committed offsets, which the writer commits only after
ClickHouse confirmed the insert; the rate runs from the first commit seen to the last, so process
start-up, the table migration and the group join are left out. Afterwards the writer is stopped
and the rows are counted in a separate process (chDB lets one process open a data directory).

The writer's per-stage costs (parse, row building, insert) are also timed in this process on the
same events, so the report can say where an event's CPU goes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import ROOT, Bench, Section, service_env, unique_prefix
from bench.decisions import (
    CONFIG,
    NO_REDIS,
    PARTITIONS,
    Window,
    create_topics,
    fetch_alone,
    fill_topic,
    run_until_committed,
)
from schemas.topics import EVENTS_TABLE, Topics
from schemas.v1 import AttemptEvent
from services.metrics.config import MetricsSettings
from services.metrics.domain.columns import decode, events_table

BATCH: int = MetricsSettings.model_fields["batch_size"].default

_TIERS = {
    "fast": (("sim-light", "openai"), ("sim-balanced", "openai")),
    "balanced": (("sim-balanced", "openai"), ("sim-light", "openai")),
    "reasoning": (("sim-reasoning", "openai"),),
    "vision": (("sim-vision", "openai"),),
}
_RULES = {
    "fast": ("short", "triage", "forced"),
    "balanced": ("default", "forced"),
    "reasoning": ("reasoning",),
    "vision": ("images",),
}
_FAILURES = (("error", "upstream_error"), ("timeout", "timeout"), ("rate_limited", "rate_limited"))


def event_payload(rng: random.Random, now: datetime) -> dict[str, Any]:
    """One attempt, shaped as the workers write it: mostly successes, some failed attempts."""
    tier = rng.choices(tuple(_TIERS), weights=(55, 30, 10, 5))[0]
    attempt = 0 if rng.random() < 0.93 else rng.randrange(1, 3)
    model, provider = _TIERS[tier][min(attempt, len(_TIERS[tier]) - 1)]
    ok = rng.random() < 0.95
    status, error_code = ("ok", "") if ok else rng.choice(_FAILURES)
    tokens_in = int(rng.lognormvariate(6, 1))
    tokens_out = int(rng.lognormvariate(5, 1)) if ok else 0
    latency = rng.lognormvariate(6.5 if tier != "reasoning" else 9, 0.6)
    return {
        "schema_version": 1,
        "event_id": f"{rng.getrandbits(128):032x}",
        "ts": (now - timedelta(milliseconds=rng.randrange(3_600_000))).isoformat(),
        "request_id": f"sbr-{rng.getrandbits(128):032x}",
        "tier": tier,
        "model": model,
        "provider": provider,
        "rule": rng.choice(_RULES[tier]),
        "config_hash": "3f9c2a7b1e5d4c60",
        "attempt": attempt,
        "status": status,
        "error_code": error_code,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "latency_ms": round(latency, 3),
        "ttft_ms": round(latency * rng.uniform(0.1, 0.5), 3) if ok else None,
        "cost_usd": round((tokens_in * 0.15 + tokens_out * 0.6) / 1e6, 9) if ok else 0.0,
        "response_sha256": hashlib.sha256(rng.randbytes(8)).hexdigest() if ok else "",
        "tenant_hash": hashlib.sha256(f"tenant-{rng.randrange(50)}".encode()).hexdigest()[:32],
    }


def event_payloads(count: int, seed: int = 5) -> tuple[list[bytes], list[bytes]]:
    """``count`` JSON events and their keys (the request id, as the workers key them)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    values: list[bytes] = []
    keys: list[bytes] = []
    for _ in range(count):
        event = event_payload(rng, now)
        values.append(json.dumps(event).encode())
        keys.append(event["request_id"].encode())
    return values, keys


_COUNT_ROWS = """
import sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
print(client.query("SELECT count() FROM switchboard.{table}").result_rows[0][0])
"""


def count_rows(data_dir: Path) -> int:
    """Rows in the writer's chDB store, counted by a fresh process (one process per directory)."""
    out = subprocess.run(
        [sys.executable, "-c", _COUNT_ROWS.format(table=EVENTS_TABLE), str(data_dir / "chdb")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(out.stdout.strip())


_STORE_ALONE = """
import asyncio, itertools, json, sys
import psutil
from services.metrics.adapters.store import ClickHouseStore
from services.metrics.domain.columns import decode, dedup_token

values_file, data_dir, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
proc = psutil.Process()
async def main():
    store = ClickHouseStore("chdb://" + data_dir, "switchboard")
    await store.migrate()
    opened = peak = proc.memory_info().rss
    with open(values_file, "rb") as lines:  # one batch in memory at a time, as the writer
        while chunk := [line.rstrip(b"\\n") for line in itertools.islice(lines, batch)]:
            decoded = decode(chunk)
            await store.insert_table(decoded.table, dedup_token(decoded.event_ids()))
            peak = max(peak, proc.memory_info().rss)
    await store.close()
    print(json.dumps({"opened_mb": opened / 2**20, "peak_mb": peak / 2**20}))
asyncio.run(main())
"""


def store_alone_rss(bench: Bench, values: Sequence[bytes], batch: int) -> dict[str, float]:
    """RSS of a bare process that only decodes the same events and inserts them into a fresh
    chDB store, batch by batch as the writer does (no Kafka): what the embedded engine holds."""
    values_file = bench.work_dir / "ingest-values.jsonl"
    values_file.write_bytes(b"".join(v + b"\n" for v in values))
    store_dir = Path(tempfile.mkdtemp(prefix="store-alone-", dir=bench.work_dir))
    out = subprocess.run(
        [sys.executable, "-c", _STORE_ALONE, str(values_file), str(store_dir), str(batch)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: round(v, 1) for k, v in figures.items()}


async def _ingest_all(
    bench: Bench, values: Sequence[bytes], keys: Sequence[bytes], data_dir: Path
) -> tuple[Window, tuple[float, float]]:
    bootstrap = bench.broker()
    prefix = unique_prefix("ingest")
    topics = Topics(prefix)
    await create_topics(bootstrap, [topics.events, topics.dead_letter], PARTITIONS)
    await fill_topic(bootstrap, topics.events, values, keys)
    fetch = await fetch_alone(bootstrap, topics.events, len(values))
    env = service_env(
        bootstrap,
        NO_REDIS,
        prefix,
        CONFIG,
        bench.work_dir / f"run-{prefix}",
        SWITCHBOARD_DATA_DIR=str(data_dir),
        SWITCHBOARD_METRICS_PORT="0",
        SWITCHBOARD_PARTITIONS=str(PARTITIONS),
    )
    window = await run_until_committed(
        bench,
        f"metrics-{prefix}",
        ["metrics"],
        env,
        topics.metrics_group,
        topics.events,
        len(values),
        poll_s=0.1,
    )
    return window, fetch


def time_decoding(values: Sequence[bytes], batch: int) -> tuple[float, float]:
    """CPU µs per event of the writer's decode, and of the way it replaced: pydantic validating
    each event, then an Arrow table built from the validated objects."""
    decode(values[:100])  # first use loads Arrow's compute functions
    started = time.process_time()
    for i in range(0, len(values), batch):
        decode(values[i : i + batch])
    arrow_us = (time.process_time() - started) * 1e6 / len(values)
    sample = values[: min(len(values), batch)]
    started = time.process_time()
    events_table([AttemptEvent.model_validate_json(v) for v in sample])
    return arrow_us, (time.process_time() - started) * 1e6 / len(sample)


def run(bench: Bench) -> Section:
    events = bench.scale(400_000, 2_000)
    values, keys = event_payloads(events)
    decode_us, pydantic_us = time_decoding(values[: bench.scale(100_000, 2_000)], BATCH)
    data_dir = Path(tempfile.mkdtemp(prefix="ingest-", dir=bench.work_dir))
    with bench.scope():
        window, (fetch_rate, fetch_us) = asyncio.run(_ingest_all(bench, values, keys, data_dir))
    rows = count_rows(data_dir)
    store_rss = store_alone_rss(bench, values, BATCH)
    counted = window.last_count - window.first_count
    per_event = {
        k: round(v * 1e6 / counted, 2) for k, v in window.threads_cpu_s.items() if v and counted
    }
    data: dict[str, Any] = {
        "events_per_s": round(window.rate) if counted else None,
        "events": events,
        "rows": rows,
        "window_events": counted,
        "window_s": round(window.seconds, 2),
        "startup_s": round(window.startup_s, 2),
        "rss_mb": round(window.rss_mb, 1),
        "store_alone_rss_mb": store_rss,
        "cpu_us_per_event": round(window.cpu_s * 1e6 / counted, 2) if counted else None,
        "cpu_us_per_event_by_thread": per_event,
        "writer_cores_busy": round(window.cpu_s / window.seconds, 2) if counted else None,
        "decode_cpu_us": round(decode_us, 2),
        "pydantic_cpu_us": round(pydantic_us, 2),
        "fetch_alone_per_s": round(fetch_rate),
        "fetch_alone_cpu_us": round(fetch_us, 2),
        "payload_bytes_mean": round(sum(map(len, values)) / len(values)),
    }
    return Section(key="metrics", data=data, markdown=_markdown(data))


def _markdown(d: dict[str, Any]) -> str:
    if not d["window_events"]:
        return (
            "### Metrics ingest\n\n"
            f"All {d['events']:,} events were committed by the first poll: too few to time "
            f"(rows {d['rows']:,} / events {d['events']:,})."
        )
    threads = d["cpu_us_per_event_by_thread"]
    python_us = threads.get("python", 0.0)
    merges_us = threads.get("MergeMutate", 0.0)
    engine_us = sum(v for k, v in threads.items() if k not in ("python", "MergeMutate"))
    lines = [
        "### Metrics ingest (events topic → ClickHouse, one metrics process)",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        f"| events/s | {d['events_per_s']:,} | ≥ 200,000 |",
        f"| rows in ClickHouse / events sent | {d['rows']:,} / {d['events']:,} | equal |",
        f"| writer CPU per event | {d['cpu_us_per_event']} µs ({d['writer_cores_busy']} cores "
        "busy) | |",
        f"| writer peak RSS | {d['rss_mb']} MB | ≤ 500 MB |",
        f"| the same inserts into chDB from a bare process (no Kafka): RSS once opened / peak "
        f"| {d['store_alone_rss_mb']['opened_mb']} / {d['store_alone_rss_mb']['peak_mb']} MB | |",
        f"| aiokafka `getmany` alone, same records | {d['fetch_alone_per_s']:,}/s, "
        f"{d['fetch_alone_cpu_us']} µs CPU each | |",
        "",
        f"{d['events']:,} events (mean {d['payload_bytes_mean']} B) were in the events topic "
        "before the writer started; the rate counts the "
        f"{d['window_events']:,} committed between the first and the last commit seen "
        f"({d['window_s']} s), leaving out start-up, migration and the group join "
        f"({d['startup_s']} s); rows are counted after the writer stopped. Per event, the "
        f"writer's Python threads (fetch, commit, decode, insert call) used {python_us} µs, "
        f"ClickHouse's insert threads {engine_us:.2f} µs and its background merges {merges_us} µs. "
        f"Decoding alone costs {d['decode_cpu_us']} µs an event (Arrow's JSON reader and "
        "column checks; pydantic per event plus an Arrow table from its objects, the way it "
        f"replaced: {d['pydantic_cpu_us']} µs) and fetching alone {d['fetch_alone_cpu_us']} µs "
        "(`getmany` alone tops out at "
        f"{d['fetch_alone_per_s']:,}/s): one Python process on aiokafka cannot reach the target "
        "here, on two cores the broker shares.",
    ]
    return "\n".join(lines)
