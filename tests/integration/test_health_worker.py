"""A worker's ``GET /ready`` tells the truth: 503 until its group assigned it, 200 then, 503 with
the reason while Redis or Kafka is away; ``GET /health`` stays 200 throughout. A real worker
against a broker and a Redis of this test's own (it stops both)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common import consumer as consumers
from services.workers.app import WorkerApp
from services.workers.config import WorkerSettings
from switchboard.embedded import Child, free_port, start_redis
from tests.conftest import ROOT
from tests.integration.stack import START_S, STOP_S, within

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def own_redis(logs_dir: Path) -> Iterator[tuple[list[Child], int]]:
    """A Redis for this test alone, on a port it can be started again on."""
    port = free_port()
    children = [start_redis(port, logs_dir)]
    yield children, port
    for child in children:
        child.stop()


async def wait_alive(client: httpx.AsyncClient) -> None:
    """Until ``/health`` answers 200 (the server starts with the service)."""
    async with asyncio.timeout(START_S):
        while True:
            try:
                if (await client.get("/health", timeout=5)).status_code == 200:
                    return
            except httpx.TransportError:
                await asyncio.sleep(0.02)


async def ready_answer(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await client.get("/ready", timeout=10)
    return response.status_code, response.json()


async def wait_ready(
    client: httpx.AsyncClient, status: int, says: str = "", timeout_s: float = 60
) -> list[tuple[int, dict[str, Any]]]:
    """Poll ``/ready`` until it answers ``status`` (with ``says`` in the reason); every answer."""
    seen: list[tuple[int, dict[str, Any]]] = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                seen.append(await ready_answer(client))
                code, body = seen[-1]
                if code == status and says in body.get("reason", ""):
                    return seen
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"/ready never answered {status} {says!r}: {seen[-5:]}") from None


async def test_worker_ready_follows_assignment_redis_and_kafka(
    own_broker: tuple[Child, str],
    own_redis: tuple[list[Child], int],
    logs_dir: Path,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consumers, "LAST_COMMIT_S", 2.0)  # the stop below finds Kafka gone
    broker, bootstrap = own_broker
    redis_children, redis_port = own_redis
    settings = WorkerSettings(
        kafka_bootstrap=bootstrap,
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        topic_prefix=topic_prefix,
        config=ROOT / "config" / "simulated.yaml",
        partitions=2,
        tier="fast",
        drain_timeout_s=2,
        worker_port=free_port(),
    )
    app = WorkerApp(settings)
    assert not app.consumer.running
    starting = asyncio.create_task(app.start())
    stopped = False
    base_url = f"http://127.0.0.1:{settings.worker_port}"
    async with httpx.AsyncClient(base_url=base_url) as client:
        try:
            # the server comes up first: alive, and not ready while the consumer joins
            await wait_alive(client)
            seen = await wait_ready(client, 200)
            await within(START_S, "the worker to start", starting)
            assert app.consumer.assigned.is_set() and app.consumer.running
            first_code, first = seen[0]
            assert first_code == 503 and first["status"] == "not ready", seen[:3]
            reasons = {body["reason"] for code, body in seen if code == 503}
            assert reasons <= {
                "starting",
                f"joining consumer group {app.consumer_group}: "
                "no partition assignment received yet",
            }, reasons
            assert seen[-1] == (200, {"status": "ready"})

            # Redis away: the worker fails open, and says it is not ready
            redis_children[0].stop()
            await wait_ready(client, 503, "Redis did not answer")
            assert (await client.get("/health")).json() == {"status": "ok"}
            redis_children.append(start_redis(redis_port, logs_dir))
            await wait_ready(client, 200)

            # Kafka away
            broker.stop()
            await wait_ready(client, 503, f"Kafka at {bootstrap} did not answer")
            assert (await client.get("/health")).status_code == 200

            await within(STOP_S, "the worker to stop", app.stop())
            stopped = True
            assert not app.consumer.running
            with pytest.raises(httpx.TransportError):
                await client.get("/health", timeout=2)  # the server went with the worker
        finally:
            if not starting.done():
                starting.cancel()
            if not stopped:
                await within(STOP_S, "the worker to stop", app.stop())


async def test_worker_without_a_port_serves_no_http(
    kafka_bootstrap: str, redis_url: str, topic_prefix: str
) -> None:
    settings = WorkerSettings(
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        topic_prefix=topic_prefix,
        config=ROOT / "config" / "simulated.yaml",
        tier="fast",
    )
    assert settings.worker_port == 0
    app = WorkerApp(settings)
    await within(START_S, "the worker to start", app.start())
    try:
        assert app.http_port is None
    finally:
        await within(STOP_S, "the worker to stop", app.stop())
