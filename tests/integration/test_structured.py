"""Tools and structured outputs on the real stack (broker, Redis, chDB, simulator), through the
official openai SDK: a parsed pydantic answer, a tool-call loop, and capability routing (a model
that cannot take tools is skipped in its tier; a tier with none refuses the request by name)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from schemas.v1 import ChatRequest, RoutedRequest
from tests.integration.stack import Stack, StackOf, collect, openai_sdk, produce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _model(name: str, simulator_url: str, capabilities: str) -> str:
    return (
        f"      - model: openai/{name}\n"
        f"        name: {name}\n"
        f"        api_base: {simulator_url}/v1\n"
        f"        capabilities: {capabilities}\n"
    )


@pytest.fixture
async def stack(stack_of: StackOf, simulator_url: str) -> AsyncIterator[Stack]:
    """Tier ``mixed``: a model without tools, then one with them; tier ``plain``: none."""
    config = (
        "version: 1\ntiers:\n"
        "  mixed:\n    interactive: true\n    models:\n"
        + _model("sim-light", simulator_url, "{tools: false, json_schema: false}")
        + _model("sim-balanced", simulator_url, "{tools: true, json_schema: true}")
        + "  plain:\n    interactive: true\n    models:\n"
        + _model("sim-light", simulator_url, "{tools: false, json_schema: false}")
        + "rules: []\ndefault: mixed\n"
    )
    async with stack_of(config, ["mixed", "plain"]) as running:
        yield running


class Triage(BaseModel):
    queue: Literal["billing", "refunds", "bugs"]
    priority: int
    summary: str


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order by its id",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


async def test_parse_returns_the_pydantic_object(stack: Stack) -> None:
    async with openai_sdk(stack) as sdk:
        completion = await sdk.chat.completions.parse(
            model="switchboard/auto",
            messages=[{"role": "user", "content": "My refund has not arrived"}],
            response_format=Triage,
        )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Triage) and parsed.queue == "billing"
    # the model without json_schema comes first in the tier: it was skipped, not asked
    assert completion.model == "sim-balanced"


async def test_a_tool_call_loop_ends_in_an_answer(stack: Stack) -> None:
    messages: list[dict[str, object]] = [{"role": "user", "content": "Where is order A-17?"}]
    async with openai_sdk(stack) as sdk:
        first = await sdk.chat.completions.create(
            model="mixed", messages=messages, tools=[LOOKUP], tool_choice="auto"
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and first.model == "sim-balanced"
        (call,) = choice.message.tool_calls or []
        assert call.function.name == "lookup_order"
        assert set(json.loads(call.function.arguments)) == {"order_id"}
        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'},
        ]
        second = await sdk.chat.completions.create(model="mixed", messages=messages, tools=[LOOKUP])
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


async def test_a_tier_without_the_capability_refuses_by_name(stack: Stack) -> None:
    async with openai_sdk(stack) as sdk:
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(
                model="plain", messages=[{"role": "user", "content": "hi"}], tools=[LOOKUP]
            )
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("unsupported_capability", "tools")
    assert "tools" in error["message"] and "plain" in error["message"]


async def test_over_kafka_the_refusal_is_a_dead_letter_and_a_chat_error(stack: Stack) -> None:
    topics = stack.topics
    request_id = f"cap-{uuid.uuid4().hex}"
    job = {
        "request_id": request_id,
        "model": "plain",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "t", "schema": {"type": "object"}},
        },
    }
    await produce(stack.bootstrap, topics.ingress, json.dumps(job).encode())
    (error,) = await collect(stack.bootstrap, topics.results, lambda seen: len(seen) >= 1)
    assert (error["request_id"], error["code"]) == (request_id, "invalid_request")
    assert "json_schema" in error["message"]
    (letter,) = await collect(stack.bootstrap, topics.dead_letter, lambda seen: len(seen) >= 1)
    assert "json_schema" in letter["reason"]


async def test_a_worker_whose_models_cannot_take_it_answers_so(stack: Stack) -> None:
    # routed by a router whose config still had a capable model: the worker checks again
    topics = stack.topics
    request = ChatRequest.model_validate(
        {
            "request_id": f"cap-{uuid.uuid4().hex}",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [LOOKUP],
        }
    )
    routed = RoutedRequest(
        request=request, tier="plain", rule="test", config_hash="old", reply_to=topics.results
    )
    await produce(stack.bootstrap, topics.tier("plain"), routed.model_dump_json().encode())
    (error,) = await collect(stack.bootstrap, topics.results, lambda seen: len(seen) >= 1)
    assert (error["request_id"], error["code"]) == (request.request_id, "unsupported_capability")
    assert "sim-light lacks tools" in error["message"] and error["attempts"] == 0
