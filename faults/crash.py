"""Scenario 1, worker crash: 10,000 requests (half over HTTP, half as Kafka ingress jobs) go to
two tiers, each served by two workers, while every 10 s one worker of each tier is SIGKILLed and a
new one started in its place.

Every HTTP request must get its 200 with a result, and every job exactly one result on the
results topic. The events topic (one event per model call) says how many model calls were made
again: the calls a killed worker had open, which its partitions' next owner makes again. They are
reported against the issue's target (at most 0.5 % of requests), not counted as duplicated: model
calls are at-least-once by design, and how many are open at a kill depends on how fast the machine
works through the backlog each kill leaves (0.01 to 0.13 % on the development VM, 0.69 % in one CI
run); what must happen once, the answer, is what ``duplicated`` counts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import (
    Bench,
    RunningStack,
    percentile,
    service_env,
    start_stack,
    tier_spec,
    write_config,
)
from faults.common import Tally, count_by
from schemas.topics import Topics
from services.workers.adapters.sent import DELIVERY_HEADER
from switchboard.embedded import Child

MODEL = "faults-crash"
PROFILE = {"ttft_s": 0.02, "tokens_per_s": 4000.0, "output_tokens": 8, "jitter": 0.0}
TIERS = ("alpha", "beta")
REQUESTS = 10_000  # half HTTP, half jobs
RATE = 50.0  # requests per second, both kinds together
KILL_EVERY_S = 10.0
HTTP_OPEN = 256  # HTTP requests open at once at most (a stalled tier queues the rest here)
REPEAT_TARGET = 0.005
WAIT_S = 180.0
# A crashed worker's partitions wait this long for a new owner. The default (6 s, the least a
# Kafka broker accepts unless group.min.session.timeout.ms is lowered) keeps the groups
# rebalancing for most of each 10 s kill cycle on this broker; see docs/reliability.md.
SESSION_TIMEOUT_MS = 3_000


@dataclass
class Crew:
    """The workers of every tier; ``kill_one`` SIGKILLs a tier's oldest and starts a new one."""

    bench: Bench
    env: dict[str, str]
    workers: dict[str, list[Child]] = field(default_factory=dict)
    kills: int = 0
    started: int = 0

    def start(self, tier: str) -> None:
        self.started += 1
        child = self.bench.service(
            f"worker-{tier}-{self.started}", ["worker", "--tier", tier], self.env
        )
        self.workers.setdefault(tier, []).append(child)

    def kill_one(self, tier: str) -> None:
        victim = self.workers[tier].pop(0)
        victim.proc.kill()  # SIGKILL: no drain, no commit
        victim.proc.wait()
        self.kills += 1
        self.start(tier)


async def _http(
    stack: RunningStack,
    statuses: Counter[int],
    retried: Counter[str],
    latencies: list[float],
    n: int,
    offset: float,
) -> None:
    gate = asyncio.Semaphore(HTTP_OPEN)
    limits = httpx.Limits(max_connections=HTTP_OPEN, max_keepalive_connections=HTTP_OPEN)
    async with httpx.AsyncClient(timeout=WAIT_S, limits=limits) as client:

        async def one(i: int) -> None:
            body = {
                "model": TIERS[i % len(TIERS)],
                "messages": [{"role": "user", "content": f"crash http {i}"}],
            }
            # like any client: an idempotency key, so a retry after a dropped connection is
            # answered once (the keep-alive race when the server closes an idle connection)
            headers = {
                "authorization": f"Bearer {stack.api_key}",
                "idempotency-key": f"{stack.prefix}-http-{i}",
            }
            try:
                for attempt in range(3):
                    try:
                        started = time.perf_counter()
                        response = await client.post(
                            f"{stack.base_url}/v1/chat/completions", json=body, headers=headers
                        )
                        latencies.append(time.perf_counter() - started)
                        statuses[response.status_code] += 1
                        return
                    except httpx.TransportError as exc:
                        if attempt == 2 or isinstance(exc, httpx.TimeoutException):
                            raise
                        retried[type(exc).__name__] += 1
            except httpx.HTTPError as exc:
                statuses[-1] += 1
                print(f"crash: HTTP request {i} failed: {exc!r}", flush=True)
            finally:
                gate.release()

        tasks = []
        start = asyncio.get_running_loop().time() + offset
        for i in range(n):
            await _until(start + i * 2 / RATE)
            await gate.acquire()
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)


async def _jobs(stack: RunningStack, n: int) -> set[str]:
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=5)
    await producer.start()
    ids = set()
    sent = []
    try:
        start = asyncio.get_running_loop().time()
        for i in range(n):
            await _until(start + i * 2 / RATE)
            request_id = f"crash-job-{i}"
            body = {
                "request_id": request_id,
                "model": TIERS[i % len(TIERS)],
                "messages": [{"role": "user", "content": f"crash job {i}"}],
            }
            ids.add(request_id)
            sent.append(
                await producer.send(Topics(stack.prefix).ingress, json.dumps(body).encode())
            )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return ids


async def _deliveries(bootstrap: str, topic: str, wanted: set[str]) -> dict[str, list[str]]:
    """For each id in ``wanted``: the ``switchboard-delivery`` header of every answer to it, and
    where the answer is (to tell a record answered twice from a request routed twice)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=50
    )
    await consumer.start()
    found: dict[str, list[str]] = {}
    try:
        quiet = 0
        while quiet < 3:
            batches = await consumer.getmany(timeout_ms=300)
            quiet = 0 if batches else quiet + 1
            for records in batches.values():
                for r in records:
                    request_id = json.loads(r.value)["request_id"]
                    if request_id in wanted:
                        header = dict(r.headers or ()).get(DELIVERY_HEADER, b"?").decode()
                        found.setdefault(request_id, []).append(
                            f"{header} -> {r.partition}@{r.offset} t={r.timestamp}"
                        )
    finally:
        await consumer.stop()
    return found


async def _until(when: float) -> None:
    delay = when - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _killer(crew: Crew, done: asyncio.Event, statuses: Counter[int]) -> None:
    started = time.perf_counter()
    while True:
        try:
            await asyncio.wait_for(done.wait(), KILL_EVERY_S)
            return
        except TimeoutError:
            for tier in TIERS:
                crew.kill_one(tier)
            print(
                f"crash: {time.perf_counter() - started:.0f} s, {crew.kills} killed, "
                f"HTTP answered {sum(statuses.values())}",
                flush=True,
            )


async def _load(
    stack: RunningStack, crew: Crew, latencies: list[float]
) -> tuple[Counter[int], set[str], float]:
    statuses: Counter[int] = Counter()
    retried: Counter[str] = Counter()
    done = asyncio.Event()
    killer = asyncio.create_task(_killer(crew, done, statuses))
    started = time.perf_counter()
    http = asyncio.create_task(_http(stack, statuses, retried, latencies, REQUESTS // 2, 1 / RATE))
    ids = await _jobs(stack, REQUESTS - REQUESTS // 2)
    await http
    await count_by(stack.bootstrap, Topics(stack.prefix).results, "request_id", ids)  # all in
    elapsed = time.perf_counter() - started
    done.set()
    await killer
    if retried:
        print(f"crash: HTTP requests retried after a dropped connection: {dict(retried)}")
    return statuses, ids, elapsed


def run(bench: Bench) -> Tally:
    sim_url = bench.simulator(profiles={MODEL: PROFILE})
    bootstrap = bench.broker()
    redis_url = bench.redis()
    tiers = {tier: tier_spec(sim_url, MODEL) for tier in TIERS}
    config = write_config(bench.work_dir / "crash.yaml", tiers, TIERS[0])
    worker_env = {
        "SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        "SWITCHBOARD_LOG_LEVEL": "INFO",  # a worker logs each answer it waits for or takes over
    }
    stack = start_stack(
        bench,
        config,
        bootstrap=bootstrap,
        redis_url=redis_url,
        tiers=TIERS,
        metrics=False,
        worker_env=worker_env,
    )
    run_dir = bench.work_dir / f"run-{stack.prefix}"
    env = service_env(bootstrap, redis_url, stack.prefix, Path(config), run_dir, **worker_env)
    crew = Crew(bench, env, {tier: [stack.children[f"worker-{tier}"]] for tier in TIERS})
    for tier in TIERS:
        crew.start(tier)
    latencies: list[float] = []
    statuses, ids, elapsed = asyncio.run(_load(stack, crew, latencies))
    waited = sorted(latencies)
    topics = Topics(stack.prefix)
    results = asyncio.run(count_by(bootstrap, topics.results, "request_id", ids))
    events = asyncio.run(count_by(bootstrap, topics.events, "request_id", set()))
    http_ok = statuses[200]
    lost = sum(1 for i in ids if results[i] == 0) + (REQUESTS // 2 - http_ok)
    duplicated = sum(results[i] - 1 for i in ids if results[i] > 1)
    worker_logs = [
        line
        for path in sorted(bench.log_dir.glob("worker-*.log"))
        for line in path.read_text(errors="replace").splitlines()
    ]
    if duplicated:
        twice = {i for i in ids if results[i] > 1}
        for request_id, where in asyncio.run(_deliveries(bootstrap, topics.results, twice)).items():
            print(f"crash: {request_id} answered {len(where)} times: {'; '.join(where)}")
            for line in worker_logs:
                if request_id in line:
                    print(f"crash:   {line}")
    held = sum(1 for line in worker_logs if "which is alive; waiting for it" in line)
    taken = sum(1 for line in worker_logs if "which is gone and whose answer" in line)
    repeated = sum(n - 1 for n in events.values() if n > 1)
    over_target = repeated > REPEAT_TARGET * REQUESTS
    tally = Tally(lost=lost, duplicated=duplicated)
    tally.detail = (
        f"{REQUESTS} requests ({REQUESTS // 2} HTTP, {len(ids)} jobs) at {RATE:g}/s over "
        f"{elapsed:.0f} s, {crew.kills} workers SIGKILLed; HTTP {dict(statuses)}, p50 "
        f"{percentile(waited, 50):.1f} s, p99 {percentile(waited, 99):.1f} s; "
        f"{sum(1 for i in ids if results[i])} jobs answered; {len(events)} requests made model "
        f"calls, {repeated} calls repeated ({100 * repeated / REQUESTS:.2f} %, "
        f"{'OVER the' if over_target else 'within the'} target of {100 * REPEAT_TARGET:g} %); "
        f"answers noted by another worker: {held} waited for it (alive), {taken} taken over "
        f"(killed, answer not out)"
    )
    return tally
