"""Scenario 9, graceful shutdown: a worker, then the router, gets SIGTERM with calls in flight;
nothing is lost, nothing is answered twice.

600 Kafka ingress jobs and 20 HTTP requests go to a tier whose model answers in 3 s, so many
calls are open at once. Once answers flow, a second worker joins and the first gets SIGTERM: it
stops fetching, finishes its calls, publishes and commits, and exits. Every job and request must be
answered exactly once, the first worker must exit 0 (drained, not killed), and the events topic
says how many model calls were made again (a request's calls beyond its first).

Then the router gets SIGTERM while 20 more HTTP callers wait for answers (their requests are on
the tier topic, the model takes 3 s): it stops taking connections, answers the callers it has,
and exits 0; every one of them must get its 200.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

from bench.common import Bench, RunningStack, routing_config, service_env, start_stack
from faults.common import Tally, count_by
from schemas.topics import Topics
from schemas.v1 import AUTO_MODEL
from services.router.service import idempotent_request_id
from switchboard.embedded import wait_for

MODEL = "faults-slow"
PROFILE = {"ttft_s": 3.0, "tokens_per_s": 4000.0, "output_tokens": 8, "jitter": 0.0}
JOBS = 600  # ~30 s of work at 64 calls open: it outlasts the second worker's start
CALLS = 20
WAIT_S = 180.0


async def _produce_jobs(stack: RunningStack) -> set[str]:
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=5)
    await producer.start()
    ids = {f"drain-job-{i}" for i in range(JOBS)}
    try:
        sent = [
            await producer.send(
                Topics(stack.prefix).ingress,
                json.dumps(
                    {"request_id": i, "messages": [{"role": "user", "content": f"job {i}"}]}
                ).encode(),
            )
            for i in sorted(ids)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return ids


def _call(stack: RunningStack, i: int) -> int:
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": AUTO_MODEL, "messages": [{"role": "user", "content": f"call {i}"}]},
        headers={
            "authorization": f"Bearer {stack.api_key}",
            "idempotency-key": f"{stack.prefix}-call-{i}",
        },
        timeout=WAIT_S,
    )
    return response.status_code


def _router_drain(stack: RunningStack) -> tuple[Counter[int], int, int]:
    """SIGTERM the router with ``CALLS`` callers waiting: their statuses, how many were still
    waiting at the signal, and the router's exit code."""
    tier_topic = Topics(stack.prefix).tier("bench")
    keys = range(CALLS, 2 * CALLS)
    ids = {idempotent_request_id(None, f"{stack.prefix}-call-{i}") for i in keys}
    with ThreadPoolExecutor(CALLS) as pool:
        calls = [pool.submit(_call, stack, i) for i in keys]
        asyncio.run(
            count_by(
                stack.bootstrap,
                tier_topic,
                lambda routed: str(routed["request"]["request_id"]),
                ids,
                WAIT_S,
                quiet_polls=0,
            )
        )
        waiting = sum(not c.done() for c in calls)
        exit_code = stack.children["router"].stop(timeout_s=60)
        return Counter(c.result() for c in calls), waiting, exit_code


def run(bench: Bench) -> Tally:
    sim_url = bench.simulator(profiles={MODEL: PROFILE})
    bootstrap = bench.broker()
    redis_url = bench.redis()
    config = routing_config(bench.work_dir / "shutdown.yaml", sim_url, MODEL, concurrency=64)
    stack = start_stack(bench, config, bootstrap=bootstrap, redis_url=redis_url, metrics=False)
    topics = Topics(stack.prefix)
    first = stack.children["worker-bench"]
    with ThreadPoolExecutor(CALLS) as pool:
        calls = [pool.submit(_call, stack, i) for i in range(CALLS)]
        ids = asyncio.run(_produce_jobs(stack))
        asyncio.run(count_by(bootstrap, topics.results, "request_id", at_least=20))  # flowing
        run_dir = bench.work_dir / f"run-{stack.prefix}"
        second = bench.service(
            f"worker-bench-2-{stack.prefix}",
            ["worker", "--tier", "bench"],
            service_env(bootstrap, redis_url, stack.prefix, Path(config), run_dir),
        )
        ready = run_dir / "ready"
        wait_for(
            "second worker",
            lambda: sum(p.name.startswith("worker-bench-") for p in ready.iterdir()) >= 2,
            120,
            second.alive,
        )
        before = len(asyncio.run(count_by(bootstrap, topics.results, "request_id")))
        if before >= JOBS:
            raise RuntimeError("every job was answered before the SIGTERM: nothing to drain")
        exit_code = first.stop(timeout_s=60)  # SIGTERM: drain, then exit
        statuses = Counter(c.result() for c in calls)
    drained, waiting, router_exit = _router_drain(stack)
    results = asyncio.run(count_by(bootstrap, topics.results, "request_id", ids, WAIT_S))
    events = asyncio.run(
        count_by(bootstrap, topics.events, "request_id", ids, WAIT_S, at_least=JOBS + CALLS)
    )
    jobs = {i: results[i] for i in ids}
    lost = sum(1 for n in jobs.values() if n == 0) + (CALLS - statuses[200])
    lost += CALLS - drained[200]
    duplicated = sum(n - 1 for n in jobs.values() if n > 1)
    repeated_calls = sum(n - 1 for n in events.values() if n > 1)
    tally = Tally(
        lost=lost, duplicated=duplicated, stuck=int(exit_code != 0) + int(router_exit != 0)
    )
    tally.detail = (
        f"{JOBS} jobs + {CALLS} HTTP calls, worker SIGTERMed with {JOBS - before} jobs "
        f"unanswered: exit code "
        f"{exit_code}; {sum(1 for n in jobs.values() if n)} jobs answered, HTTP {dict(statuses)}; "
        f"{len(events)} requests made model calls, {repeated_calls} calls repeated; router "
        f"SIGTERMed with {waiting} of {CALLS} HTTP callers waiting: exit code {router_exit}, "
        f"HTTP {dict(drained)}"
    )
    return tally
