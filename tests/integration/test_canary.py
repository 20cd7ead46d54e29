"""A canary end to end on the real broker, chDB and the provider SIMULATOR: the controller
promotes a healthy candidate, rolls it back once the simulator makes it fail, and an operator
starts it again; every row, state and decision is where analysts and routers look for it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.control import ExperimentState
from services.common.control import ControlReader
from services.controller.app import ControllerApp
from services.controller.config import ControllerSettings
from switchboard.canary import canary_command
from switchboard.embedded import free_port
from tests.integration.stack import API_KEY, Infra, Stack, wait_until, within

pytestmark = pytest.mark.integration

CANDIDATE = "sim-balanced-next"

CONFIG = """
tiers:
  balanced:
    interactive: true
    timeout_s: 10
    retries_per_model: 0
    models:
      - {{model: openai/sim-balanced, name: sim-balanced, api_base: "{sim}/v1",
         price_as: gpt-4.1-mini}}
default: balanced
experiments:
  {name}:
    tier: balanced
    candidate: {{model: openai/{candidate}, name: {candidate}, api_base: "{sim}/v1",
                price_as: gpt-4.1-mini}}
    share: 25
    steps: [25, 50, 100]
    sticky: tenant
    interval_s: 1
    min_samples: 8
    confidence: 0.8
    criteria:
      - error_rate <= baseline.error_rate + 0.1
    rollback_when:
      - error_rate > baseline.error_rate + 0.3
"""


@pytest.fixture
async def canary(infra: Infra) -> AsyncIterator[tuple[Stack, ControllerApp, str, Path]]:
    name = f"exp-{infra.prefix}"
    path = infra.config(CONFIG.format(sim=infra.simulator_url, name=name, candidate=CANDIDATE))
    port = free_port()
    async with infra.stack(path, ["balanced"], metrics_port=port) as stack:
        settings = ControllerSettings(
            **infra.settings(path),
            metrics_url=f"http://127.0.0.1:{port}",
            controller_tick_s=0.2,
        )
        controller = ControllerApp(settings)
        await within(60, "the controller to start", controller.start())
        try:
            yield stack, controller, name, path
        finally:
            await within(30, "the controller to stop", controller.stop())
            async with httpx.AsyncClient(base_url=infra.simulator_url) as sim:
                await sim.post(f"/simulator/profiles/{CANDIDATE}/reset")


async def traffic(stack: Stack, stop: asyncio.Event, sent: list[dict[str, Any]]) -> None:
    """Requests of ever new tenants, 8 at a time, until ``stop``; every one must be answered."""
    tenants = itertools.count()
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=30) as http:

        async def one() -> None:
            body = {
                "model": "balanced",
                "messages": [{"role": "user", "content": "summarise the ticket"}],
                "metadata": {"tenant": f"tenant-{next(tenants)}"},
            }
            resp = await http.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            sent.append(resp.json())

        while not stop.is_set():
            await asyncio.gather(*(one() for _ in range(8)))


async def query(stack: Stack, sql: str) -> list[list[Any]]:
    return (await stack.metrics.store.query(sql))[1]


async def test_promote_rollback_and_operator(
    canary: tuple[Stack, ControllerApp, str, Path],
    simulator_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    stack, controller, name, config_path = canary
    states = controller.reader.states

    def share() -> float | None:
        state = states.get(name)
        return None if state is None else state.share_pct

    stop, sent = asyncio.Event(), []
    load = asyncio.create_task(traffic(stack, stop, sent))
    try:
        # healthy: 25 → 50 (the next step, once both sides have 8 requests at 25 %)
        await wait_until(lambda: _now(share() == 50.0), 90, "a promotion to 50 %")
        # the simulator makes the candidate fail every call: the tier's model answers instead
        # (in-tier fallback), and the controller rolls the candidate back
        async with httpx.AsyncClient(base_url=simulator_url) as sim:
            resp = await sim.patch(f"/simulator/profiles/{CANDIDATE}", json={"error_rate_500": 1.0})
            assert resp.status_code == 200, resp.text
        await wait_until(
            lambda: _now(states[name].status == "rolled_back"), 90, "a rollback to 0 %"
        )
    finally:
        stop.set()
        await within(60, "the traffic to end", load)

    state: ExperimentState = states[name]
    assert state.share_pct == 0.0 and "error_rate > baseline.error_rate + 0.3" in state.reason
    # no client saw the candidate's failures: every request was answered (traffic asserts 200)
    assert {r["model"] for r in sent} == {"sim-balanced", CANDIDATE}

    # every decision is in switchboard.decisions (written by the metrics service)
    decisions = await wait_until(
        lambda: _rows(
            stack,
            "SELECT action, share_from, share_to FROM switchboard.decisions "
            f"WHERE experiment = '{name}' AND action != 'hold' ORDER BY decided_at",
            3,
        ),
        30,
        "the decisions to be stored",
    )
    assert [tuple(d) for d in decisions] == [
        ("start", 0.0, 25.0),
        ("promote", 25.0, 50.0),
        ("rollback", 50.0, 0.0),
    ]
    # the rows say which variant each call was, at which share
    rows = await query(
        stack,
        "SELECT variant, share_pct, model, countIf(status = 'ok'), countIf(status != 'ok')"
        f" FROM switchboard.llm_events WHERE experiment = '{name}'"
        " GROUP BY variant, share_pct, model ORDER BY variant, share_pct, model",
    )
    seen = {(r[0], r[1], r[2]) for r in rows}
    assert ("candidate", 25.0, CANDIDATE) in seen and ("baseline", 25.0, "sim-balanced") in seen
    failed = {(r[0], r[1], r[2]): r[4] for r in rows}
    assert failed.get(("candidate", 50.0, CANDIDATE), 0) > 0  # the failing candidate, on record

    # an operator starts it again, then pauses it; routers apply both
    monkeypatch.setenv("SWITCHBOARD_KAFKA_BOOTSTRAP", stack.bootstrap)
    monkeypatch.setenv("SWITCHBOARD_TOPIC_PREFIX", stack.topics.prefix)
    monkeypatch.setenv("SWITCHBOARD_CONFIG", str(config_path))
    monkeypatch.setenv("SWITCHBOARD_DATA_DIR", str(tmp_path / "no-stack"))
    monkeypatch.setenv("SWITCHBOARD_CLICKHOUSE_URL", "http://127.0.0.1:1")  # status: states only
    assert await asyncio.to_thread(canary_command, "promote", name) == 0
    await wait_until(lambda: _now(share() == 25.0), 30, "the operator's promote to apply")
    assert states[name].status == "running" and states[name].by == "operator"
    assert await asyncio.to_thread(canary_command, "pause", name) == 0
    await wait_until(lambda: _now(states[name].status == "paused"), 30, "the pause to apply")
    assert await asyncio.to_thread(canary_command, "pause", name) == 1  # paused already
    assert await asyncio.to_thread(canary_command, "promote", "nope") == 2

    # the router reads the same topic: its next requests follow the operator's share
    reader = ControlReader(stack.bootstrap, stack.topics.control, "test-reader")
    await within(60, "a reader to catch up", reader.start())
    try:
        assert reader.states[name].share_pct == 25.0
        assert reader.states[name].status == "paused"
    finally:
        await within(30, "the reader to stop", reader.stop())


async def _now(value: bool) -> bool:
    return value


async def _rows(stack: Stack, sql: str, count: int) -> list[list[Any]] | None:
    rows = await query(stack, sql)
    return rows if len(rows) >= count else None
