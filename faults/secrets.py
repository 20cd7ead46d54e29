"""Scenario 8, secrets, prompts and PII: after a run with a provider key and marked prompts full
of planted PII, none of them appears in any service's log, on the events topic or in a row of
llm_events, and no PII or key in a captured payload (llm_payloads keeps the prompts and answers
of the captured tenant, redacted).

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
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import Bench, RunningStack, start_stack, tier_spec, write_config
from faults.common import Tally, chdb_rows
from schemas.topics import EVENTS_TABLE, PAYLOADS_TABLE, Topics
from schemas.v1 import AUTO_MODEL

MODEL = "faults-secrets"
PROFILE = {"ttft_s": 0.01, "tokens_per_s": 4000.0, "output_tokens": 24, "jitter": 0.0}
KEY_ENV = "FAULTS_PROVIDER_KEY"
REQUESTS = 20  # per way in
WAIT_S = 120.0


TENANT = "secret-tenant"  # captured (capture.tenants): its prompts and answers go to llm_payloads


def _config(bench: Bench, sim_url: str) -> Path:
    tier = tier_spec(sim_url, MODEL)
    tier["models"][0]["api_key_env"] = KEY_ENV
    tier["retries_per_model"] = 1
    path = write_config(bench.work_dir / "secrets.yaml", {"bench": tier}, "bench")
    spec = yaml.safe_load(path.read_text())
    spec["capture"] = {"tenants": [TENANT]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _card() -> str:
    """A card number of this run: 15 random digits and the Luhn check digit."""
    digits = [int(d) for d in str(uuid.uuid4().int)[:15]]
    total = sum(
        d if i % 2 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits))
    )
    number = "".join(map(str, digits)) + str((10 - total % 10) % 10)
    return " ".join(number[i : i + 4] for i in range(0, 16, 4))


def _planted_pii() -> dict[str, str]:
    """PII and secrets of this run, put in every prompt (the simulator echoes them back)."""
    run = uuid.uuid4().hex[:12]
    return {
        "email": f"pii-{run}@example.com",
        "card": _card(),
        "api key": f"sk-proj-{run}{run}",
        "bearer token": f"Bearer tok{run}{run}",
        "phone": "+44 20 7946 0958",
        "ip": f"10.{int(run[:2], 16)}.{int(run[2:4], 16)}.{int(run[4:6], 16)}",
    }


def _prompt(marker: str, label: str, pii: dict[str, str]) -> str:
    return f"{marker} {label}: " + ", ".join(f"my {kind} is {value}" for kind, value in pii.items())


def _http_requests(stack: RunningStack, marker: str, pii: dict[str, str]) -> int:
    answered = 0
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        for i in range(REQUESTS):
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": AUTO_MODEL,
                    "messages": [{"role": "user", "content": _prompt(marker, f"http {i}", pii)}],
                    "metadata": {"tenant": TENANT},
                },
                headers={"authorization": f"Bearer {stack.api_key}"},
            )
            answered += response.status_code in (200, 429, 502)
    return answered


async def _ingress_jobs(stack: RunningStack, marker: str, pii: dict[str, str]) -> int:
    topics = Topics(stack.prefix)
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    ids = {f"secret-job-{i}" for i in range(REQUESTS)}
    try:
        for request_id in ids:
            body = {
                "request_id": request_id,
                "messages": [{"role": "user", "content": _prompt(marker, request_id, pii)}],
                "metadata": {"tenant": TENANT},
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
    pii = _planted_pii()
    http_answered = _http_requests(stack, marker, pii)
    jobs_answered = asyncio.run(_ingress_jobs(stack, marker, pii))
    events = asyncio.run(_events(stack))
    for name in ("router", "worker-bench", "metrics"):  # metrics inserts what it holds first
        bench.stop(stack.children[name])
    data_dir = bench.work_dir / f"data-{stack.prefix}"
    rows = chdb_rows(data_dir / "chdb", f"SELECT * FROM switchboard.{EVENTS_TABLE}")
    kept = chdb_rows(data_dir / "chdb", f"SELECT * FROM switchboard.{PAYLOADS_TABLE}")
    logs = {p.name: p.read_text(errors="replace") for p in bench.log_dir.glob("*") if p.is_file()}

    places: list[str] = []
    planted = [(value, kind) for kind, value in pii.items()]
    for what, texts in (
        ("log", logs.items()),
        ("event", ((f"#{i}", t.decode(errors="replace")) for i, t in enumerate(events))),
        ("row", ((f"#{i}", t) for i, t in enumerate(rows))),
    ):
        for name, text in texts:
            for secret, label in (
                (key, "provider key"),
                (marker, "prompt/response text"),
                *planted,
            ):
                if secret in text:
                    places.append(f"{label} in {what} {name}")
    # llm_payloads keeps prompts and answers (that is what capture is for), never the PII in them
    for i, text in enumerate(kept):
        for secret, label in ((key, "provider key"), *planted):
            if secret in text:
                places.append(f"{label} in captured payload #{i}")
    captured = sum(marker in text for text in kept)
    lost = (REQUESTS - http_answered) + (REQUESTS - jobs_answered)
    if len(rows) < len(events) or not events:
        lost += max(len(events) - len(rows), 1)  # the scan must have something to scan
    if captured < 2 * REQUESTS:  # every prompt captured (inputs at least): a scan of something
        lost += 2 * REQUESTS - captured
    tally = Tally(leaked=len(places), lost=lost)
    tally.detail = (
        f"{http_answered}+{jobs_answered} of {2 * REQUESTS} requests answered (6 provider 500s "
        f"injected); scanned {len(logs)} log files, {len(events)} event records, {len(rows)} "
        f"ClickHouse rows, {len(kept)} captured payloads ({captured} with the prompt marker, "
        f"PII planted: {', '.join(pii)}): {len(places)} hits"
        + (f" ({'; '.join(places[:5])})" if places else "")
    )
    return tally
