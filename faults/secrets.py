"""Scenario 8, secrets and prompts: after a run with a provider key and marked prompts, neither
appears in any service's log, on the events topic or in a ClickHouse row.

The workers get a provider key (``api_key_env``) made of a unique marker; every prompt carries
another marker, and the simulator echoes prompts into its answers, so the prompt marker also marks
response text. Requests go in over HTTP and over the Kafka ingress, at the services' default log
level, with injected provider 500s so the retry and error paths log too. Then every log file, every
record of the events topic and every row of ``llm_events`` is searched for either marker.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import Bench, RunningStack, start_stack, tier_spec, write_config
from faults.common import Tally, chdb_rows
from schemas.topics import EVENTS_TABLE, Topics
from schemas.v1 import AUTO_MODEL

MODEL = "faults-secrets"
PROFILE = {"ttft_s": 0.01, "tokens_per_s": 4000.0, "output_tokens": 24, "jitter": 0.0}
KEY_ENV = "FAULTS_PROVIDER_KEY"
REQUESTS = 20  # per way in
WAIT_S = 120.0


def _config(bench: Bench, sim_url: str) -> Path:
    tier = tier_spec(sim_url, MODEL)
    tier["models"][0]["api_key_env"] = KEY_ENV
    tier["retries_per_model"] = 1
    return write_config(bench.work_dir / "secrets.yaml", {"bench": tier}, "bench")


def _http_requests(stack: RunningStack, marker: str) -> int:
    answered = 0
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        for i in range(REQUESTS):
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": AUTO_MODEL,
                    "messages": [{"role": "user", "content": f"{marker} http {i}"}],
                    "metadata": {"tenant": "secret-tenant"},
                },
                headers={"authorization": f"Bearer {stack.api_key}"},
            )
            answered += response.status_code in (200, 429, 502)
    return answered


async def _ingress_jobs(stack: RunningStack, marker: str) -> int:
    topics = Topics(stack.prefix)
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    ids = {f"secret-job-{i}" for i in range(REQUESTS)}
    try:
        for request_id in ids:
            body = {
                "request_id": request_id,
                "messages": [{"role": "user", "content": f"{marker} {request_id}"}],
            }
            await producer.send_and_wait(topics.ingress, json.dumps(body).encode())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topics.results, bootstrap_servers=stack.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: set[str] = set()
    try:
        async with asyncio.timeout(WAIT_S):
            while not ids <= seen:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    seen.update(json.loads(r.value)["request_id"] for r in records)
    finally:
        await consumer.stop()
    return len(ids & seen)


async def _events(stack: RunningStack) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        Topics(stack.prefix).events,
        bootstrap_servers=stack.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[bytes] = []
    try:
        idle = 0
        while idle < 3:
            batches = await consumer.getmany(timeout_ms=300)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                out.extend((r.key or b"") + b" " + (r.value or b"") for r in records)
    finally:
        await consumer.stop()
    return out


def _inject_errors(sim_url: str) -> None:
    httpx.post(
        f"{sim_url}/simulator/faults",
        json={"model": MODEL, "kind": "500", "count": 6},
        timeout=10,
    ).raise_for_status()


def run(bench: Bench) -> Tally:
    key = f"sk-canary-{uuid.uuid4().hex}"
    marker = f"canary-prompt-{uuid.uuid4().hex}"
    sim_url = bench.simulator(profiles={MODEL: PROFILE})
    bootstrap = bench.broker()
    redis_url = bench.redis()
    config = _config(bench, sim_url)
    env = {KEY_ENV: key, "SWITCHBOARD_LOG_LEVEL": "INFO"}
    stack = start_stack(bench, config, bootstrap=bootstrap, redis_url=redis_url, extra_env=env)
    _inject_errors(sim_url)
    http_answered = _http_requests(stack, marker)
    jobs_answered = asyncio.run(_ingress_jobs(stack, marker))
    events = asyncio.run(_events(stack))
    for name in ("router", "worker-bench", "metrics"):  # metrics inserts what it holds first
        bench.stop(stack.children[name])
    data_dir = bench.work_dir / f"data-{stack.prefix}"
    rows = chdb_rows(data_dir / "chdb", f"SELECT * FROM switchboard.{EVENTS_TABLE}")
    logs = {p.name: p.read_text(errors="replace") for p in bench.log_dir.glob("*") if p.is_file()}

    places: list[str] = []
    for what, texts in (
        ("log", logs.items()),
        ("event", ((f"#{i}", t.decode(errors="replace")) for i, t in enumerate(events))),
        ("row", ((f"#{i}", t) for i, t in enumerate(rows))),
    ):
        for name, text in texts:
            for secret, label in ((key, "provider key"), (marker, "prompt/response text")):
                if secret in text:
                    places.append(f"{label} in {what} {name}")
    lost = (REQUESTS - http_answered) + (REQUESTS - jobs_answered)
    if len(rows) < len(events) or not events:
        lost += max(len(events) - len(rows), 1)  # the scan must have something to scan
    tally = Tally(leaked=len(places), lost=lost)
    tally.detail = (
        f"{http_answered}+{jobs_answered} of {2 * REQUESTS} requests answered (6 provider 500s "
        f"injected); scanned {len(logs)} log files, {len(events)} event records, {len(rows)} "
        f"ClickHouse rows: {len(places)} hits" + (f" ({'; '.join(places[:5])})" if places else "")
    )
    return tally
