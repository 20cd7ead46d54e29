"""Live routing config on the real broker, Redis and chDB: a config on the config topic is
validated and applied by the router and the worker without a restart; a bad one is refused and
the old one keeps serving; a request in flight finishes on the config it began with, and every
row says which config the worker used."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from schemas.control import ConfigUpdate
from services.common.routing_config import load_config_text
from tests.integration.stack import API_KEY, Infra, Stack, produce, wait_until, within

pytestmark = pytest.mark.integration

BEFORE = """
tiers:
  fast:
    interactive: true
    timeout_s: 30
    request_timeout_s: 60
    retries_per_model: 0
    models:
      - {{model: openai/sim-light, name: sim-light, api_base: "{sim}/v1", price_as: gpt-4o-mini}}
default: fast
"""
AFTER = BEFORE.replace("sim-light, name: sim-light", "sim-balanced, name: sim-balanced")


@pytest.fixture
async def live(infra: Infra) -> AsyncIterator[tuple[Stack, str]]:
    path = infra.config(BEFORE.format(sim=infra.simulator_url))
    async with infra.stack(path, ["fast"]) as stack:
        try:
            yield stack, infra.simulator_url
        finally:
            async with httpx.AsyncClient(base_url=infra.simulator_url) as sim:
                await sim.post("/simulator/profiles/sim-light/reset")


async def apply(stack: Stack, text: str) -> None:
    update = ConfigUpdate(text=text, config_hash="", source="test", by="test")
    await produce(stack.bootstrap, stack.topics.config, update.model_dump_json().encode())


async def health_hash(http: httpx.AsyncClient) -> str:
    return str((await http.get("/health")).json()["config_hash"])


async def test_a_new_config_applies_live_and_a_request_in_flight_keeps_its_own(
    live: tuple[Stack, str],
) -> None:
    stack, sim = live
    before = load_config_text(BEFORE.format(sim=sim), "before").hash
    after = load_config_text(AFTER.format(sim=sim), "after").hash
    headers = {"authorization": f"Bearer {API_KEY}"}
    body = {"model": "fast", "messages": [{"role": "user", "content": "Where is my parcel?"}]}
    async with (
        httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=60) as http,
        httpx.AsyncClient(base_url=sim, timeout=10) as simulator,
    ):
        assert await health_hash(http) == before
        # a request in flight on sim-light, held there for a while
        resp = await simulator.patch("/simulator/profiles/sim-light", json={"ttft_s": 100.0})
        assert resp.status_code == 200
        served = (await simulator.get("/simulator/stats")).json()["models"]["sim-light"]
        held = asyncio.create_task(http.post("/v1/chat/completions", json=body))

        async def arrived() -> bool:
            stats = (await simulator.get("/simulator/stats")).json()["models"]["sim-light"]
            return bool(stats["requests"] > served["requests"])

        await wait_until(arrived, 30, "the held request to reach sim-light")

        # a config that does not load is refused; the old one keeps serving
        watch = stack.router_app.state.config_watch
        await apply(stack, BEFORE.format(sim=sim).replace("default: fast", "default: nowhere"))
        await wait_until(lambda: _now(watch.refused == 1), 30, "the refusal")
        assert "unknown tier 'nowhere'" in watch.last_refusal
        assert await health_hash(http) == before

        await apply(stack, AFTER.format(sim=sim))
        await wait_until(lambda: _is(health_hash(http), after), 30, "the router to apply it")
        worker = stack.workers["fast"]
        await wait_until(lambda: _now(worker.service.config.hash == after), 30, "the worker")
        fresh = await http.post("/v1/chat/completions", json=body)
        assert fresh.json()["model"] == "sim-balanced"
        assert fresh.headers["x-switchboard-config-hash"] == after

        await simulator.post("/simulator/profiles/sim-light/reset")
        old = await within(60, "the held request", held)
        assert old.status_code == 200 and old.json()["model"] == "sim-light"  # its own config

    ids = [old.headers["x-switchboard-request-id"], fresh.headers["x-switchboard-request-id"]]
    rows = await wait_until(
        lambda: _rows(
            stack,
            "SELECT request_id, model, config_hash, worker_config_hash FROM switchboard.llm_events"
            f" WHERE request_id IN ('{ids[0]}', '{ids[1]}') ORDER BY ts",
            2,
        ),
        30,
        "both rows",
    )
    by_id = {r[0]: r[1:] for r in rows}
    assert by_id[ids[0]] == ["sim-light", before, before]
    assert by_id[ids[1]] == ["sim-balanced", after, after]

    # a worker refuses a config without its tier, and keeps serving its own
    refused = worker.config_watch.offer(AFTER.format(sim=sim).replace("fast", "other"), "test")
    assert not refused and "no tier 'fast'" in worker.config_watch.last_refusal
    assert worker.service.config.hash == after


async def _now(value: bool) -> bool:
    return value


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _rows(stack: Stack, sql: str, count: int) -> list[list[Any]] | None:
    found = (await stack.metrics.store.query(sql))[1]
    return found if len(found) >= count else None
