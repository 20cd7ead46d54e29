"""The metrics writer's ``GET /ready``: 503 until its group assigned it, 200 while chDB answers
``SELECT 1``, 503 with the reason when the store does not answer in time. Real broker, real chDB."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from services.metrics import app as metrics_app
from services.metrics.app import MetricsApp
from services.metrics.config import MetricsSettings
from switchboard.embedded import free_port
from tests.integration.stack import START_S, STOP_S, within
from tests.integration.test_health_worker import ready_answer, wait_alive, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_metrics_ready_follows_assignment_and_the_store(
    kafka_bootstrap: str,
    topic_prefix: str,
    chdb_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_app, "STORE_PROBE_S", 0.5)
    settings = MetricsSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        partitions=2,
        data_dir=chdb_data_dir,
        metrics_port=free_port(),
        metrics_token="secret",
    )
    app = MetricsApp(settings)
    starting = asyncio.create_task(app.start())
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{settings.metrics_port}"
        ) as client:
            await wait_alive(client)  # no token needed for health and readiness, unlike /query
            seen = await wait_ready(client, 200)
            await within(START_S, "the metrics service to start", starting)
            assert app.consumer.assigned.is_set() and app.consumer.running
            assert seen[0][0] == 503 and seen[0][1]["status"] == "not ready", seen[:3]
            joining = f"joining consumer group {settings.topics.metrics_group}"
            reasons = {body["reason"] for code, body in seen if code == 503}
            assert all(r == "starting" or r.startswith(joining) for r in reasons), reasons
            assert seen[-1] == (200, {"status": "ready"})

            # the store does not answer (a hung insert holds its one thread): 503 in bounded time
            probes = 0
            release = asyncio.Event()
            answer = app.store.query

            async def hung(sql: str) -> tuple[list[str], list[list[object]]]:
                nonlocal probes
                probes += 1
                await release.wait()
                return await answer(sql)

            monkeypatch.setattr(app.store, "query", hung)
            await wait_ready(client, 503, "ClickHouse did not answer SELECT 1 in 0.5 s")
            for _ in range(3):  # probes meanwhile share the one waiting: nothing piles up
                assert (await ready_answer(client))[0] == 503
            assert probes == 1
            release.set()
            await wait_ready(client, 200)
    finally:
        if not starting.done():
            starting.cancel()
        await within(STOP_S, "the metrics service to stop", app.stop())
    assert not app.consumer.running
