"""Scenario 5: async jobs end to end through the Kafka ingress, every one accounted for.

A producer writes N ChatRequests to the ingress topic as fast as the broker takes them; the
router classifies them onto the tier topic, one worker calls the simulator (``sim-instant``,
answering at once), results land on the results topic and attempt events in ClickHouse. The
rate is N over the time from the first send to the last distinct result. CPU per job is read
for every process, so the report can say where the time went.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from bench.common import (
    Bench,
    ProcSampler,
    Section,
    TopicCounter,
    produce_all,
    start_stack,
    tier_spec,
    write_config,
)
from schemas.topics import Topics
from schemas.v1 import ChatRequest

MODEL = "sim-instant"
CONCURRENCY = 256


def job(i: int) -> tuple[bytes, bytes]:
    request = ChatRequest.model_validate(
        {
            "model": "switchboard/auto",
            "request_id": f"job-{uuid.uuid4().hex}",
            "messages": [
                {"role": "system", "content": "You write release notes."},
                {"role": "user", "content": f"Draft the notes for build {i}."},
            ],
            "metadata": {"tenant": "bench", "task": "summarise"},
        }
    )
    return request.request_id.encode(), request.model_dump_json().encode()


async def _run_jobs(
    bootstrap: str, topics: Topics, count: int, timeout_s: float
) -> dict[str, float]:
    counter = TopicCounter(bootstrap, topics.results)
    await counter.start()
    try:
        await counter.poll()
        start = time.perf_counter()
        producing = asyncio.create_task(
            produce_all(bootstrap, topics.ingress, (job(i) for i in range(count)))
        )
        done = await counter.wait_for(count, timeout_s)
        await producing
        sent_s = time.perf_counter() - start
        last = max(counter.first_seen.values()) if counter.first_seen else time.perf_counter()
        return {
            "wall_s": last - start,
            "all_answered": done,
            "distinct": len(counter.first_seen),
            "records": counter.records,
            "produce_s": sent_s,
        }
    finally:
        await counter.stop()


async def _outcome_kinds(
    bootstrap: str, topic: str, count: int
) -> tuple[dict[str, int], dict[str, int]]:
    """How many results are answers and how many are errors, by error code (read back once)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    kinds: dict[str, int] = {}
    codes: dict[str, int] = {}
    seen = 0
    try:
        async with asyncio.timeout(120):
            while seen < count:
                batches = await consumer.getmany(timeout_ms=200, max_records=50_000)
                for records in batches.values():
                    for r in records:
                        seen += 1
                        outcome = json.loads(r.value)
                        kind = outcome.get("kind", "?")
                        kinds[kind] = kinds.get(kind, 0) + 1
                        if kind == "error":
                            code = f"{outcome.get('code')}: {str(outcome.get('message'))[:120]}"
                            codes[code] = codes.get(code, 0) + 1
    finally:
        await consumer.stop()
    return kinds, codes


def run(bench: Bench) -> Section:
    count = bench.scale(100_000, 500)
    with bench.scope():
        bootstrap = bench.broker()
        broker_pid = bench.children[-1].pid
        redis_url = bench.redis()
        sim = bench.simulator()
        sim_pid = bench.children[-1].pid
        config = write_config(
            bench.work_dir / "jobs-bench.yaml",
            {"bench": tier_spec(sim, MODEL, interactive=False, concurrency=CONCURRENCY)},
            "bench",
        )
        stack = start_stack(bench, config, bootstrap=bootstrap, redis_url=redis_url)
        topics = Topics(stack.prefix)
        pids = {
            "router": stack.pid("router"),
            "worker": stack.pid("worker-bench"),
            "metrics": stack.pid("metrics"),
            "simulator": sim_pid,
            "broker": broker_pid,
        }
        samplers = {name: ProcSampler([pid]).start() for name, pid in pids.items()}
        outcome = asyncio.run(_run_jobs(bootstrap, topics, count, timeout_s=900))
        samples = {name: s.stop() for name, s in samplers.items()}
        kinds, codes = asyncio.run(
            _outcome_kinds(bootstrap, topics.results, int(outcome["records"]))
        )

    wall = outcome["wall_s"]
    data = {
        "count": count,
        # completed = answered with a model's result; an error answer is accounted for but
        # is not a completed job
        "completed": kinds.get("result", 0),
        "answered": int(outcome["distinct"]),
        "answers": kinds.get("result", 0),
        "errors": kinds.get("error", 0),
        "error_codes": codes,
        "duplicates": int(outcome["records"] - outcome["distinct"]),
        "jobs_per_s": round(outcome["distinct"] / wall, 1),
        "produce_s": round(outcome["produce_s"], 1),
        "wall_s": round(wall, 1),
        "cpu_ms_per_job": {n: round(s.cpu_s / count * 1000, 3) for n, s in samples.items()},
        "rss_mb_peak": {n: round(s.rss_mb_peak, 1) for n, s in samples.items()},
    }
    return Section("jobs", data, _markdown(data))


def _markdown(d: dict) -> str:  # type: ignore[type-arg]
    cpu = d["cpu_ms_per_job"]
    rows = [f"| {name} | {ms} | {d['rss_mb_peak'][name]} |" for name, ms in cpu.items()]
    total = round(sum(cpu.values()), 3)
    return "\n".join(
        [
            "## Async jobs through the Kafka ingress (simulator answering at once)",
            "",
            f"{d['count']:,} jobs: {d['answered']:,} answered ({d['answers']:,} results, "
            f"{d['errors']:,} errors), {d['duplicates']:,} duplicate results, in {d['wall_s']} s: "
            f"**{d['jobs_per_s']} jobs/s** (one router, one worker, metrics writing every "
            "attempt).",
            "",
            "| process | CPU ms per job | peak RSS MB |",
            "|---|---:|---:|",
            *rows,
            f"| all | {total} | |",
        ]
    )
