"""Scenario 4, broker restart: the embedded broker is killed with HTTP calls in flight and started
again on the same port, empty (it keeps everything in memory).

Every caller that was waiting must get an answer or a clear error (OpenAI-shaped, 5xx) rather than
hang; the router, worker and metrics must reconnect by themselves, without a restart, so that
HTTP calls and Kafka ingress jobs are answered again; and no process may exit.
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
from switchboard.embedded import free_port, start_broker

MODEL = "faults-broker"
PROFILE = {"ttft_s": 1.5, "tokens_per_s": 4000.0, "output_tokens": 8, "jitter": 0.0}
IN_FLIGHT = 20
DOWN_S = 3.0
RECOVER_S = 90.0  # the services must answer again within this long after the restart
AFTER = 20


async def _ask(client: httpx.AsyncClient, stack: RunningStack, i: int) -> tuple[int, float, dict]:
    started = time.perf_counter()
    response = await client.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": AUTO_MODEL, "messages": [{"role": "user", "content": f"broker {i}"}]},
        headers={"authorization": f"Bearer {stack.api_key}"},
    )
    return response.status_code, time.perf_counter() - started, response.json()


async def _published(stack: RunningStack, n: int) -> None:
    """Wait until ``n`` requests are on the tier topic (the callers are waiting for answers)."""
    consumer = AIOKafkaConsumer(
        Topics(stack.prefix).tier("bench"),
        bootstrap_servers=stack.bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    seen = 0
    try:
        async with asyncio.timeout(60):
            while seen < n:
                seen += sum(len(r) for r in (await consumer.getmany(timeout_ms=200)).values())
    finally:
        await consumer.stop()


async def _job(stack: RunningStack) -> bool:
    """One Kafka ingress job after the restart: is it answered with a result?"""
    topics = Topics(stack.prefix)
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        body = {"request_id": "broker-job", "messages": [{"role": "user", "content": "job"}]}
        await producer.send_and_wait(topics.ingress, json.dumps(body).encode())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topics.results, bootstrap_servers=stack.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        async with asyncio.timeout(RECOVER_S):
            while True:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for r in records:
                        outcome = json.loads(r.value)
                        if outcome["request_id"] == "broker-job":
                            return bool(outcome["kind"] == "result")
    except TimeoutError:
        return False
    finally:
        await consumer.stop()


async def _scenario(bench: Bench, stack: RunningStack, port: int) -> tuple[Tally, str]:
    tally = Tally()
    async with httpx.AsyncClient(timeout=RECOVER_S * 2) as client:
        calls = [asyncio.create_task(_ask(client, stack, i)) for i in range(IN_FLIGHT)]
        await _published(stack, IN_FLIGHT)
        broker = next(c for c in bench.children if c.name == "broker" and c.alive())
        broker.proc.kill()
        broker.proc.wait()
        killed_at = time.perf_counter()
        await asyncio.sleep(DOWN_S)  # the outage itself: what the scenario is about
        bench.adopt(start_broker(port, bench.log_dir))
        restarted_at = time.perf_counter()
        waited = await asyncio.gather(*calls, return_exceptions=True)

        # the callers that were waiting when the broker died: an answer or a clear error each
        codes: Counter[int] = Counter()
        slowest = 0.0
        for outcome in waited:
            if isinstance(outcome, BaseException):
                tally.stuck += 1
                continue
            status, seconds, body = outcome
            codes[status] += 1
            slowest = max(slowest, seconds)
            if status != 200 and not (
                isinstance(body.get("error"), dict) and body["error"].get("message")
            ):
                tally.lost += 1  # an error nobody can act on

        # the services reconnect by themselves: calls are answered again
        recovered_s = None
        i = 1000
        while time.perf_counter() - restarted_at < RECOVER_S:
            status, _, _ = await _ask(client, stack, i)
            i += 1
            if status == 200:
                recovered_s = time.perf_counter() - restarted_at
                break
        if recovered_s is None:
            tally.stuck += 1
        after = Counter(
            status
            for status, _, _ in await asyncio.gather(
                *(_ask(client, stack, 2000 + j) for j in range(AFTER))
            )
        )
        tally.lost += AFTER - after[200]
    job_ok = await _job(stack)
    tally.lost += int(not job_ok)
    again = "never" if recovered_s is None else f"{recovered_s:.1f} s"
    detail = (
        f"broker killed with {IN_FLIGHT} calls waiting, back after {restarted_at - killed_at:.1f}"
        f" s: waiting callers got {dict(codes)} (slowest {slowest:.1f} s); answering again "
        f"{again} after the restart; "
        f"then HTTP {dict(after)}, ingress job {'answered' if job_ok else 'NOT answered'}"
    )
    return tally, detail


def run(bench: Bench) -> Tally:
    sim_url = bench.simulator(profiles={MODEL: PROFILE})
    port = free_port()
    bench.adopt(start_broker(port, bench.log_dir))
    bootstrap = f"127.0.0.1:{port}"
    redis_url = bench.redis()
    config = routing_config(bench.work_dir / "broker.yaml", sim_url, MODEL)
    stack = start_stack(bench, config, bootstrap=bootstrap, redis_url=redis_url)
    tally, detail = asyncio.run(_scenario(bench, stack, port))
    crashed = [name for name, child in stack.children.items() if not child.alive()]
    tally.stuck += len(crashed)
    tally.detail = f"{detail}; processes exited: {crashed or 'none'}"
    return tally
