"""A request that names a model on the real stack: it goes through that model's tier, its rows
say rule ``pinned``, and when the model fails no other model answers, unless the model's config
allows it (``pinned_fallback``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from tests.integration.stack import Stack, StackOf, openai_sdk, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
async def stack(stack_of: StackOf, simulator_url: str) -> AsyncIterator[Stack]:
    base = f"        api_base: {simulator_url}/v1\n"
    config = (
        "version: 1\ntiers:\n  mixed:\n    interactive: true\n    retry_backoff_s: 0\n"
        "    models:\n"
        "      - model: openai/sim-light\n        name: sim-light\n        aliases: [light]\n"
        + base
        + "      - model: openai/sim-balanced\n        name: sim-balanced\n"
        + "        pinned_fallback: true\n"
        + base
        + "rules: []\ndefault: mixed\n"
    )
    async with stack_of(config, ["mixed"]) as running:
        yield running


async def fail_next(simulator_url: str, model: str, count: int) -> None:
    async with httpx.AsyncClient(base_url=simulator_url) as http:
        body = {"model": model, "kind": "500", "count": count}
        (await http.post("/simulator/faults", json=body)).raise_for_status()


async def rows(stack: Stack, request_id: str, count: int) -> list[list[object]]:
    sql = (
        "SELECT attempt, model, rule, status FROM switchboard.llm_events "
        f"WHERE request_id = '{request_id}' ORDER BY attempt"
    )
    _, found = await stack.metrics.store.query(sql)
    return found if len(found) >= count else []


async def test_a_pinned_model_answers_alone_and_its_rows_say_pinned(
    stack: Stack, simulator_url: str
) -> None:
    async with openai_sdk(stack) as sdk:
        answered = await sdk.chat.completions.with_raw_response.create(
            model="light", messages=[{"role": "user", "content": "hi"}]
        )
        assert answered.headers["x-switchboard-rule"] == "pinned"
        assert answered.parse().model == "sim-light"
        ok_id = answered.headers["x-switchboard-request-id"]
        # both tries of sim-light fail: sim-balanced, next in the tier, is not asked
        await fail_next(simulator_url, "sim-light", 2)
        with pytest.raises(openai.APIStatusError) as failed:
            await sdk.chat.completions.with_raw_response.create(
                model="sim-light", messages=[{"role": "user", "content": "hi"}]
            )
    assert failed.value.status_code == 502
    failed_id = failed.value.response.headers["x-switchboard-request-id"]
    assert await wait_until(lambda: rows(stack, ok_id, 1)) == [[0, "sim-light", "pinned", "ok"]]
    found = await wait_until(lambda: rows(stack, failed_id, 2))
    assert [r[1:] for r in found] == [["sim-light", "pinned", "error"]] * 2


async def test_a_pinned_model_that_allows_fallback_lets_the_tier_answer(
    stack: Stack, simulator_url: str
) -> None:
    await fail_next(simulator_url, "sim-balanced", 2)
    async with openai_sdk(stack) as sdk:
        answered = await sdk.chat.completions.with_raw_response.create(
            model="sim-balanced", messages=[{"role": "user", "content": "hi"}]
        )
    assert answered.parse().model == "sim-light"
    request_id = answered.headers["x-switchboard-request-id"]
    found = await wait_until(lambda: rows(stack, request_id, 3))
    assert [r[1:] for r in found] == [
        ["sim-balanced", "pinned", "error"],
        ["sim-balanced", "pinned", "error"],
        ["sim-light", "pinned", "ok"],
    ]
