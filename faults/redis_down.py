"""Scenario 3, Redis down for 30 s and back: nothing crashes, requests keep being answered
(workers fail open: without the outcome cache a redelivery would cost a second model call, not
an answer), and everything works again once Redis returns.

HTTP requests go in one after another the whole time (before, during and after the outage), and a
burst of Kafka ingress jobs is sent while Redis is down. Every request must be answered with a
result, every job too, and every process of the stack must still be running at the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import Bench, RunningStack, routing_config, start_stack
from faults.common import Tally
from schemas.topics import Topics
from schemas.v1 import AUTO_MODEL
from switchboard.embedded import free_port, start_redis, wait_for

MODEL = "faults-redis"
PROFILE = {"ttft_s": 0.02, "tokens_per_s": 4000.0, "output_tokens": 8, "jitter": 0.0}
DOWN_S = 30.0
JOBS = 50
WAIT_S = 120.0


def _ask(client: httpx.Client, stack: RunningStack, i: int) -> int:
    response = client.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": AUTO_MODEL, "messages": [{"role": "user", "content": f"redis {i}"}]},
        headers={"authorization": f"Bearer {stack.api_key}"},
    )
    return response.status_code


def _for(client: httpx.Client, stack: RunningStack, seconds: float, start: int) -> Counter[int]:
    """Requests one after another for ``seconds``; their status codes."""
    codes: Counter[int] = Counter()
    end = time.monotonic() + seconds
    i = start
    while time.monotonic() < end:
        codes[_ask(client, stack, i)] += 1
        i += 1
    return codes


async def _jobs(stack: RunningStack) -> int:
    topics = Topics(stack.prefix)
    ids = {f"redis-job-{i}" for i in range(JOBS)}
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        for request_id in sorted(ids):
            body = {"request_id": request_id, "messages": [{"role": "user", "content": "job"}]}
            await producer.send_and_wait(topics.ingress, json.dumps(body).encode())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topics.results, bootstrap_servers=stack.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    answered: set[str] = set()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not ids <= answered and loop.time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    outcome = json.loads(r.value)
                    if outcome.get("kind") == "result":
                        answered.add(outcome["request_id"])
    finally:
        await consumer.stop()
    return len(ids & answered)


def run(bench: Bench) -> Tally:
    sim_url = bench.simulator(profiles={MODEL: PROFILE})
    bootstrap = bench.broker()
    port = free_port()
    redis = bench.adopt(start_redis(port, bench.log_dir))
    redis_url = f"redis://127.0.0.1:{port}/0"
    config = routing_config(bench.work_dir / "redis.yaml", sim_url, MODEL)
    stack = start_stack(bench, config, bootstrap=bootstrap, redis_url=redis_url)
    with httpx.Client(timeout=60) as client:
        before = _for(client, stack, 3, 0)
        bench.stop(redis)
        during = _for(client, stack, DOWN_S / 2, 10_000)
        jobs = asyncio.run(_jobs(stack))
        during += _for(client, stack, DOWN_S / 2, 20_000)
        redis = bench.adopt(start_redis(port, bench.log_dir))
        after = _for(client, stack, 5, 30_000)
    crashed = [name for name, child in stack.children.items() if not child.alive()]
    wait_for("redis back", redis.alive, 5)
    lost = sum(n for code, n in (before + during + after).items() if code != 200)
    lost += JOBS - jobs
    tally = Tally(lost=lost, stuck=len(crashed) + int(not after.get(200)))
    tally.detail = (
        f"HTTP before {dict(before)}, during {DOWN_S:g} s down {dict(during)}, after "
        f"{dict(after)}; {jobs}/{JOBS} ingress jobs sent while down answered; processes "
        f"crashed: {crashed or 'none'}"
    )
    return tally
