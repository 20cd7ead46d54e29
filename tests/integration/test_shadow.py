"""Shadow traffic on the real broker, chDB and the provider SIMULATOR: the tier answers every
request, the mirrored share goes to the candidate through the shadow worker's own group, and
each pair is compared in llm_shadow; a slow candidate's surplus is dropped and counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.shadow.app import ShadowApp
from services.shadow.config import ShadowSettings
from tests.integration.stack import API_KEY, Infra, Stack, wait_until, within

pytestmark = pytest.mark.integration

CANDIDATE = "sim-balanced-next"
CONFIG = """
tiers:
  fast:
    interactive: true
    timeout_s: 10
    models:
      - {{model: openai/sim-light, name: sim-light, api_base: "{sim}/v1", price_as: gpt-4o-mini}}
default: fast
experiments:
  {name}:
    tier: fast
    mode: shadow
    share: 100
    sticky: request
    max_in_flight: 2
    candidate: {{model: openai/{candidate}, name: {candidate}, api_base: "{sim}/v1",
                price_as: gpt-4.1-mini}}
"""


@pytest.fixture
async def shadowed(infra: Infra) -> AsyncIterator[tuple[Stack, ShadowApp, str]]:
    name = f"shadow-{infra.prefix}"
    path = infra.config(CONFIG.format(sim=infra.simulator_url, name=name, candidate=CANDIDATE))
    async with infra.stack(path, ["fast"]) as stack:
        app = ShadowApp(ShadowSettings(**infra.settings(path)))
        await within(60, "the shadow worker to start", app.start())
        try:
            await within(60, "the shadow worker to join", app.wait_assigned())
            yield stack, app, name
        finally:
            await within(30, "the shadow worker to stop", app.stop())
            async with httpx.AsyncClient(base_url=infra.simulator_url) as sim:
                await sim.post(f"/simulator/profiles/{CANDIDATE}/reset")


async def ask(stack: Stack, count: int) -> list[dict[str, Any]]:
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=30) as http:

        async def one(i: int) -> dict[str, Any]:
            body = {"model": "fast", "messages": [{"role": "user", "content": f"Ticket {i}"}]}
            resp = await http.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            return resp.json()

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def rows(stack: Stack, sql: str, at_least: int) -> list[list[Any]] | None:
    found = (await stack.metrics.store.query(sql))[1]
    return found if len(found) >= at_least else None


async def test_mirrored_requests_are_compared_and_the_surplus_dropped(
    shadowed: tuple[Stack, ShadowApp, str], simulator_url: str
) -> None:
    stack, shadow, name = shadowed
    answers = await ask(stack, 2)
    assert {a["model"] for a in answers} == {"sim-light"}  # never the shadow's answer
    compared = await wait_until(
        lambda: rows(
            stack,
            "SELECT request_id, outcome, baseline_model, candidate_model, same_response,"
            " similarity, similarity_by, candidate_latency_ms, candidate_tokens_out"
            f" FROM switchboard.llm_shadow WHERE experiment = '{name}' ORDER BY request_id",
            2,
        ),
        60,
        "two comparisons",
    )
    for row in compared:
        assert row[1:4] == ["compared", "sim-light", CANDIDATE]
        assert row[4] is False and 0 < row[5] < 1 and row[6] == "text"
        assert row[7] > 0 and row[8] > 0
    # the candidate's calls are attempt rows of their own, variant shadow, beside the tier's
    variants = await wait_until(
        lambda: rows(
            stack,
            "SELECT variant, model, count() FROM switchboard.llm_events"
            f" WHERE experiment = '{name}' GROUP BY variant, model ORDER BY variant",
            2,
        ),
        60,
        "the shadow calls' rows",
    )
    assert [tuple(v) for v in variants] == [("baseline", "sim-light", 2), ("shadow", CANDIDATE, 2)]

    # a slow candidate: two calls at a time, the rest of a burst is dropped, and counted
    async with httpx.AsyncClient(base_url=simulator_url) as sim:
        resp = await sim.patch(f"/simulator/profiles/{CANDIDATE}", json={"ttft_s": 150.0})
        assert resp.status_code == 200, resp.text
    answers = await ask(stack, 10)
    assert {a["model"] for a in answers} == {"sim-light"}  # the tier did not wait for it

    async def all_twelve() -> list[list[Any]] | None:
        found = await rows(
            stack,
            "SELECT outcome, count(), any(reason) FROM switchboard.llm_shadow"
            f" WHERE experiment = '{name}' GROUP BY outcome ORDER BY outcome",
            1,
        )
        return found if found and sum(o[1] for o in found) == 12 else None

    outcomes = await wait_until(all_twelve, 90, "a comparison row for each of the 12")
    counts = {o[0]: o[1] for o in outcomes}
    assert counts.get("dropped", 0) >= 1 and counts["compared"] >= 2
    assert "max_in_flight" in next(o[2] for o in outcomes if o[0] == "dropped")
    assert shadow.service.outcomes["dropped"] == counts["dropped"]
