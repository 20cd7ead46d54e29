"""The services wired in one event loop against the real broker, Redis and chDB (for tests)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.topics import Topics
from services.common.runtime import HttpServer, start_http, stop_http
from services.metrics.app import MetricsApp
from services.metrics.config import MetricsSettings
from services.router.app import create_app
from services.router.config import RouterSettings
from services.workers.app import WorkerApp
from services.workers.config import WorkerSettings

API_KEY = "sk-test-key"


@dataclass
class Stack:
    base_url: str
    topics: Topics
    bootstrap: str
    workers: dict[str, WorkerApp]
    metrics: MetricsApp
    router_app: Any


def common(bootstrap: str, redis_url: str, prefix: str, config: Path) -> dict[str, Any]:
    return {
        "kafka_bootstrap": bootstrap,
        "redis_url": redis_url,
        "topic_prefix": prefix,
        "config": config,
        "partitions": 2,
    }


@asynccontextmanager
async def running_stack(
    bootstrap: str, redis_url: str, prefix: str, config: Path, data_dir: Path, tiers: list[str]
) -> AsyncIterator[Stack]:
    base = common(bootstrap, redis_url, prefix, config)
    metrics = MetricsApp(MetricsSettings(**base, data_dir=data_dir, metrics_port=0, batch_size=500))
    workers = {t: WorkerApp(WorkerSettings(**base, tier=t, drain_timeout_s=5)) for t in tiers}
    app = create_app(RouterSettings(**base, api_key=API_KEY, port=0))
    started: list[Any] = []
    http: tuple[HttpServer, asyncio.Task[None]] | None = None
    try:
        await metrics.start()
        started.append(metrics)
        for w in workers.values():
            await w.start()
            started.append(w)
        http = await start_http(app, "127.0.0.1", 0, lifespan=True)
        port = http[0].bound_port  # type: ignore[attr-defined]
        stack = Stack(f"http://127.0.0.1:{port}", Topics(prefix), bootstrap, workers, metrics, app)
        await asyncio.gather(*(w.wait_assigned() for w in workers.values()))
        yield stack
    finally:
        if http:
            await stop_http(*http)
        for part in reversed(started):
            await part.stop()


async def produce(bootstrap: str, topic: str, *payloads: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        for p in payloads:
            await producer.send_and_wait(topic, p)
    finally:
        await producer.stop()


async def collect(
    bootstrap: str, topic: str, until: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 60
) -> list[dict[str, Any]]:
    """Read ``topic`` from the start until ``until(messages)`` holds."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not until(seen):
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    seen.extend(json.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return seen


async def wait_until(
    check: Callable[[], Any], timeout_s: float = 60, what: str = "condition"
) -> Any:
    async with asyncio.timeout(timeout_s):
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.05)
