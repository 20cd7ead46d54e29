"""A cascade tier on the real stack (broker, Redis, chDB, the provider simulator): the light model
drafts, the verifier rejects its poor drafts, the strong model answers those; over HTTP (whole
and streamed) and the Kafka ingress, with every step in llm_events.

Which drafts are poor is the simulator's doing (services/simulator/quality.py): sim-light answers
most maths poorly, and the same prompt always gets the same verdict, so the test asks the
simulator first which of its prompts sim-light fails and which it answers well.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.metrics.domain.report import Window, cascade_sql
from tests.integration.stack import Stack, StackOf, collect, openai_sdk, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]

MATHS = [
    "Find x if 3x + 7 = 22 and explain each step",
    "Solve 5y - 9 = 31 for y, showing your working",
    "What is the derivative of x^3 + 2x^2 with respect to x?",
    "Compute the integral of 2x from 0 to 3 and explain each step",
    "If 4a + 2 = 18, what is a? Show each step",
]
SUPPORT = [
    "How do I change the email address on my account?",
    "Where can I download last month's invoice?",
    "My parcel has not arrived yet, can you check order 5521?",
]


def config(simulator_url: str) -> str:
    def model(name: str) -> str:
        price = {"sim-light": (0.15, 0.6), "sim-reasoning": (2, 8)}[name]
        return (
            f"{{model: openai/{name}, name: {name}, api_base: '{simulator_url}/v1', "
            f"input_cost_per_mtok: {price[0]}, output_cost_per_mtok: {price[1]}, "
            "capabilities: {tools: true, json_schema: true, params: [user, metadata]}}"
        )

    return (
        "version: 1\ntiers:\n"
        "  careful:\n    kind: cascade\n    interactive: true\n"
        f"    cascade:\n      draft: {model('sim-light')}\n"
        "      verify: {refusals: true, min_chars: 20, json_valid: true}\n"
        f"    models: [{model('sim-reasoning')}]\n"
        "rules: []\ndefault: careful\n"
    )


async def quality(simulator_url: str, model: str, prompt: str, **body: Any) -> str:
    """good or poor: what the simulator answers ``prompt`` with, asked directly."""
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{simulator_url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": prompt}], **body},
        )
    answer.raise_for_status()
    return answer.headers["x-simulator-quality"]


async def pick(simulator_url: str, prompts: list[str], wanted: str, **body: Any) -> str:
    for prompt in prompts:
        if await quality(simulator_url, "sim-light", prompt, **body) == wanted:
            return prompt
    raise AssertionError(f"none of {prompts} gets a {wanted} answer from sim-light")


@pytest.fixture
async def stack(stack_of: StackOf, simulator_url: str) -> AsyncIterator[Stack]:
    async with stack_of(config(simulator_url), ["careful"]) as running:
        yield running


async def rows(stack: Stack, request_id: str, count: int) -> list[list[Any]]:
    sql = (
        "SELECT attempt, model, status, cascade_step, verdict, verdict_reason "
        f"FROM switchboard.llm_events WHERE request_id = '{request_id}' ORDER BY attempt"
    )

    async def found() -> list[list[Any]] | None:
        _, got = await stack.metrics.store.query(sql)
        return got if len(got) >= count else None

    result: list[list[Any]] = await wait_until(found, 60, f"{count} rows of {request_id}")
    return result


async def test_a_poor_draft_escalates_and_a_good_one_is_the_answer(
    stack: Stack, simulator_url: str
) -> None:
    poor = await pick(simulator_url, MATHS, "poor")
    good = await pick(simulator_url, SUPPORT, "good")
    async with openai_sdk(stack) as sdk:
        escalated = await sdk.chat.completions.with_raw_response.create(
            model="switchboard/auto", messages=[{"role": "user", "content": poor}]
        )
        accepted = await sdk.chat.completions.with_raw_response.create(
            model="switchboard/auto", messages=[{"role": "user", "content": good}]
        )
    strong, light = escalated.parse(), accepted.parse()
    assert strong.model == "sim-reasoning" and escalated.headers["x-switchboard-attempts"] == "2"
    assert light.model == "sim-light" and accepted.headers["x-switchboard-attempts"] == "1"
    text = light.choices[0].message.content or ""
    assert "not sure" not in text.lower() and len(text) >= 20

    first, second = await rows(stack, escalated.headers["x-switchboard-request-id"], 2)
    assert first[:5] == [0, "sim-light", "ok", "draft", "rejected"]
    assert first[5].startswith("refusal or doubt")
    assert second[:5] == [1, "sim-reasoning", "ok", "escalation", ""]
    [only] = await rows(stack, accepted.headers["x-switchboard-request-id"], 1)
    assert only == [0, "sim-light", "ok", "draft", "accepted", "passed"]

    # switchboard report's cascade figures: one of two escalated, and cheaper than the strong
    # model alone
    columns, [row] = await stack.metrics.store.query(cascade_sql("switchboard", Window.last(1)))
    figures = dict(zip(columns, row, strict=True))
    assert (figures["tier"], figures["requests"], figures["escalated"]) == ("careful", 2, 1)
    assert figures["escalation_rate"] == 0.5
    assert 0 < figures["usd_per_request"] < figures["strong_usd_per_request"]
    assert figures["saved_pct"] > 0 and figures["strong_p50_ms"] > 0


async def test_a_streamed_answer_starts_after_the_verdict(stack: Stack, simulator_url: str) -> None:
    poor = await pick(simulator_url, MATHS, "poor")
    good = await pick(simulator_url, SUPPORT, "good")
    async with openai_sdk(stack) as sdk:
        for prompt, model in ((poor, "sim-reasoning"), (good, "sim-light")):
            stream = await sdk.chat.completions.create(
                model="switchboard/auto",
                messages=[{"role": "user", "content": prompt}],
                stream=True,
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert {c.model for c in chunks} == {model}
            assert text and "not sure" not in text.lower()
            assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason


async def test_a_draft_that_breaks_the_json_schema_escalates(
    stack: Stack, simulator_url: str
) -> None:
    schema = {
        "type": "object",
        "properties": {"x": {"type": "number"}, "steps": {"type": "array"}},
        "required": ["x", "steps"],
        "additionalProperties": False,
    }
    form = {"type": "json_schema", "json_schema": {"name": "solution", "schema": schema}}
    poor = await pick(simulator_url, MATHS, "poor", response_format=form)
    async with openai_sdk(stack) as sdk:
        answer = await sdk.chat.completions.with_raw_response.create(
            model="switchboard/auto",
            messages=[{"role": "user", "content": poor}],
            response_format=form,  # type: ignore[arg-type]
        )
    assert answer.parse().model == "sim-reasoning"
    assert set(json.loads(answer.parse().choices[0].message.content or "")) == {"x", "steps"}
    first, _ = await rows(stack, answer.headers["x-switchboard-request-id"], 2)
    assert first[4] == "rejected"
    assert "JSON" in first[5]


async def test_a_kafka_job_goes_through_the_cascade(stack: Stack, simulator_url: str) -> None:
    poor = await pick(simulator_url, MATHS, "poor")
    request_id = f"job-{uuid.uuid4().hex[:8]}"
    job = {"request_id": request_id, "messages": [{"role": "user", "content": poor}]}
    await produce(stack.bootstrap, stack.topics.ingress, json.dumps(job).encode())
    results = await collect(
        stack.bootstrap,
        stack.topics.results,
        lambda seen: any(r.get("request_id") == request_id for r in seen),
    )
    [result] = [r for r in results if r.get("request_id") == request_id]
    assert (result["kind"], result["model"], result["attempts"]) == ("result", "sim-reasoning", 2)
    first, second = await rows(stack, request_id, 2)
    assert (first[3], first[4], second[3]) == ("draft", "rejected", "escalation")


async def test_the_example_config_escalates_a_failing_draft(
    stack_of: StackOf, simulator_url: str
) -> None:
    """config/examples/cascade.yaml as shipped: a maths question with no metadata goes to the
    reasoning tier by the semantic stage, sim-light drafts, the draft is rejected, sim-reasoning
    answers."""
    text = (ROOT / "config" / "examples" / "cascade.yaml").read_text()
    text = text.replace("${SWITCHBOARD_SIMULATOR_URL:-http://127.0.0.1:8090}", simulator_url)
    text = text.replace(
        "classifier: ../routes.json", f"classifier: {ROOT / 'config' / 'routes.json'}"
    )
    poor = await pick(simulator_url, MATHS, "poor")
    async with stack_of(text, ["reasoning"]) as stack, openai_sdk(stack) as sdk:
        answer = await sdk.chat.completions.with_raw_response.create(
            model="switchboard/auto", messages=[{"role": "user", "content": poor}]
        )
        assert answer.headers["x-switchboard-tier"] == "reasoning"
        assert answer.headers["x-switchboard-rule"] == "semantic:maths"
        assert answer.parse().model == "sim-reasoning"
        draft, escalation = await rows(stack, answer.headers["x-switchboard-request-id"], 2)
    assert draft[1:5] == ["sim-light", "ok", "draft", "rejected"]
    assert escalation[1:4] == ["sim-reasoning", "ok", "escalation"]


async def test_a_judge_scores_drafts_the_other_checks_passed(
    stack_of: StackOf, simulator_url: str
) -> None:
    """The judge (sim-balanced, asked for JSON {"score": n}) is called only for a draft that
    passed the other checks; the simulator's JSON answer to that schema scores 0, under 7."""
    judge = (
        f"      judge: {{model: {{model: openai/sim-balanced, name: sim-balanced, "
        f"api_base: '{simulator_url}/v1', capabilities: {{json_schema: true}}}}, "
        "rubric: Answers the question asked, min_score: 7}\n"
    )
    text = config(simulator_url).replace(
        "      verify: {refusals: true, min_chars: 20, json_valid: true}\n",
        "      verify:\n        min_chars: 20\n" + judge.replace("      judge", "        judge"),
    )
    good = await pick(simulator_url, SUPPORT, "good")
    poor = await pick(simulator_url, MATHS, "poor")
    async with stack_of(text, ["careful"]) as stack, openai_sdk(stack) as sdk:
        judged = await sdk.chat.completions.with_raw_response.create(
            model="switchboard/auto", messages=[{"role": "user", "content": good}]
        )
        refused = await sdk.chat.completions.with_raw_response.create(
            model="switchboard/auto", messages=[{"role": "user", "content": poor}]
        )
        assert judged.parse().model == "sim-reasoning"
        assert judged.headers["x-switchboard-attempts"] == "3"
        draft, judge_row, escalation = await rows(
            stack, judged.headers["x-switchboard-request-id"], 3
        )
        # the poor draft failed a cheaper check first: no judge was asked
        first, second = await rows(stack, refused.headers["x-switchboard-request-id"], 2)
    assert draft[:6] == [0, "sim-light", "ok", "draft", "rejected", "judge score 0, under 7"]
    assert judge_row[:4] == [1, "sim-balanced", "ok", "judge"]
    assert escalation[:4] == [2, "sim-reasoning", "ok", "escalation"]
    assert (first[3], first[4], second[3]) == ("draft", "rejected", "escalation")
    assert first[5].startswith("refusal or doubt")
