"""Scenario 2, ClickHouse unavailable for 60 s under load: the metrics writer (chDB runs inside
it, so its process is the ClickHouse the stack sees) is SIGKILLed mid-stream and started again
60 s later on the same data directory.

HTTP requests go in one after another the whole time; each makes one model call and one event.
Every request must get its 200 (the router and workers do not wait on ClickHouse), and at the end
every event on the events topic must be exactly one row: none lost while the writer was down,
none stored twice because its last batches were inserted and never committed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.common import Bench, RunningStack, routing_config, service_env, start_stack
from faults.common import Tally, chdb_rows, count_by
from schemas.topics import EVENTS_TABLE, Topics
from schemas.v1 import AUTO_MODEL
from services.common.tansu import log_ends
from switchboard.embedded import wait_for

MODEL = "faults-clickhouse"
PROFILE = {"ttft_s": 0.01, "tokens_per_s": 4000.0, "output_tokens": 8, "jitter": 0.0}
BEFORE_S = 10.0
DOWN_S = 60.0
AFTER_S = 5.0
WAIT_S = 180.0


def _for(client: httpx.Client, stack: RunningStack, seconds: float, codes: Counter[int]) -> None:
    """Requests one after another for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        response = client.post(
            f"{stack.base_url}/v1/chat/completions",
            json={"model": AUTO_MODEL, "messages": [{"role": "user", "content": "count me"}]},
            headers={"authorization": f"Bearer {stack.api_key}"},
        )
        codes[response.status_code] += 1


async def _behind(bootstrap: str, group: str, topic: str) -> int:
    """Events on ``topic`` that ``group`` has not committed yet."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await consumer.start()
    await admin.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await log_ends(consumer, tps)
        committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        return sum(
            end - max(committed[tp].offset if tp in committed else 0, 0) for tp, end in ends.items()
        )
    finally:
        await admin.close()
        await consumer.stop()


async def _caught_up(bootstrap: str, group: str, topic: str) -> int:
    """Wait until ``group`` has committed all of ``topic``; what is left (0 when it has)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        behind = await _behind(bootstrap, group, topic)
        if not behind or loop.time() > deadline:
            return behind
        await asyncio.sleep(0.5)


def run(bench: Bench) -> Tally:
    sim_url = bench.simulator(profiles={MODEL: PROFILE})
    bootstrap = bench.broker()
    redis_url = bench.redis()
    config = routing_config(bench.work_dir / "clickhouse.yaml", sim_url, MODEL)
    stack = start_stack(bench, config, bootstrap=bootstrap, redis_url=redis_url)
    topics = Topics(stack.prefix)
    run_dir = bench.work_dir / f"run-{stack.prefix}"
    data_dir = bench.work_dir / f"data-{stack.prefix}"
    env = service_env(
        bootstrap,
        redis_url,
        stack.prefix,
        Path(config),
        run_dir,
        SWITCHBOARD_DATA_DIR=str(data_dir),
        SWITCHBOARD_METRICS_PORT="0",
    )
    codes: Counter[int] = Counter()
    with httpx.Client(timeout=60) as client:
        _for(client, stack, BEFORE_S, codes)
        writer = stack.children["metrics"]
        writer.proc.kill()  # SIGKILL: whatever it inserted and did not commit is read again
        writer.proc.wait()
        before = sum(codes.values())
        _for(client, stack, DOWN_S, codes)
        during = sum(codes.values()) - before
        (run_dir / "ready" / "metrics").unlink(missing_ok=True)
        writer = bench.service(f"metrics-2-{stack.prefix}", ["metrics"], env)
        wait_for("metrics again", (run_dir / "ready" / "metrics").exists, 120, writer.alive)
        _for(client, stack, AFTER_S, codes)
    behind = asyncio.run(_caught_up(bootstrap, topics.metrics_group, topics.events))
    writer.stop()  # SIGTERM: it commits and closes chDB, so the directory can be read
    events = asyncio.run(count_by(bootstrap, topics.events, "event_id"))
    rows = Counter(chdb_rows(data_dir / "chdb", f"SELECT event_id FROM switchboard.{EVENTS_TABLE}"))
    again = sum(
        int(line.split(" events read again")[0].rsplit(" ", 1)[-1])
        for line in writer.log_path.read_text(errors="replace").splitlines()
        if " events read again had rows already" in line
    )
    lost = len(set(events) - set(rows)) + sum(n for code, n in codes.items() if code != 200)
    duplicated = sum(n - 1 for n in rows.values() if n > 1)
    crashed = [
        name for name, child in stack.children.items() if name != "metrics" and not child.alive()
    ]
    tally = Tally(lost=lost, duplicated=duplicated, stuck=int(behind > 0) + len(crashed))
    tally.detail = (
        f"metrics (chDB) SIGKILLed after {BEFORE_S:g} s and down {DOWN_S:g} s: HTTP "
        f"{dict(codes)} ({during} while it was down); {len(events)} events on the topic, "
        f"{sum(rows.values())} rows for {len(rows)} events ({again} events read again after "
        f"the kill had rows already and were not inserted again); caught up "
        f"{'yes' if not behind else f'no, {behind} behind'}; processes exited: {crashed or 'none'}"
    )
    return tally
