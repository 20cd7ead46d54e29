"""OpenAI's other chat parameters on the real stack: each is passed to a model that takes it
(litellm's supported parameters, or the config's ``capabilities.params``), a model that does not
is skipped in its tier, and a tier with none refuses the request by name, over HTTP and Kafka."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import openai
import pytest

from tests.integration.stack import Stack, StackOf, collect, openai_sdk, produce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
async def stack(stack_of: StackOf, simulator_url: str) -> AsyncIterator[Stack]:
    """Tier ``mixed``: a model behind litellm's Mistral provider (no ``n``, ``logprobs`` or
    ``logit_bias``), then an OpenAI-compatible one; tier ``narrow``: the first alone. Both are
    served by the simulator; the Mistral one is never called."""
    base = f"        api_base: {simulator_url}/v1\n"
    mistral = "      - model: mistral/sim-light\n        name: mistral-light\n" + base
    openai_model = (
        "      - model: openai/sim-balanced\n        name: sim-balanced\n"
        + base
        + "        capabilities: {params: [user, metadata]}\n"
    )
    config = (
        "version: 1\ntiers:\n"
        "  mixed:\n    interactive: true\n    models:\n"
        + mistral
        + openai_model
        + "  narrow:\n    interactive: true\n    models:\n"
        + mistral
        + "rules: []\ndefault: mixed\n"
    )
    async with stack_of(config, ["mixed", "narrow"]) as running:
        yield running


async def test_parameters_reach_a_model_that_takes_them(stack: Stack) -> None:
    async with openai_sdk(stack) as sdk:
        completion = await sdk.chat.completions.create(
            model="mixed",
            messages=[{"role": "user", "content": "Two ways to say hello"}],
            n=2,
            logprobs=True,
            top_logprobs=2,
            max_completion_tokens=8,
            seed=7,
            user="agent-7",
            metadata={"ticket": "T-1"},
        )
    # the Mistral model takes neither n nor logprobs: skipped, not asked
    assert completion.model == "sim-balanced"
    assert [c.index for c in completion.choices] == [0, 1]
    first, second = (c.message.content for c in completion.choices)
    assert first and second and first != second
    for choice in completion.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        tokens = "".join(t.token for t in choice.logprobs.content)
        assert tokens == choice.message.content
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert completion.usage is not None and completion.usage.completion_tokens == 16


async def test_a_tier_without_a_model_that_takes_it_refuses_by_name(stack: Stack) -> None:
    async with openai_sdk(stack) as sdk:
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(
                model="narrow",
                messages=[{"role": "user", "content": "hi"}],
                logit_bias={"50256": -100},
            )
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("unsupported_parameter", "logit_bias")
    assert "mistral-light lacks parameter 'logit_bias'" in error["message"]


async def test_over_kafka_the_refusal_is_a_dead_letter_and_a_chat_error(stack: Stack) -> None:
    topics = stack.topics
    request_id = f"param-{uuid.uuid4().hex}"
    job = {
        "request_id": request_id,
        "model": "narrow",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 3,
    }
    await produce(stack.bootstrap, topics.ingress, json.dumps(job).encode())
    (error,) = await collect(stack.bootstrap, topics.results, lambda seen: len(seen) >= 1)
    assert (error["request_id"], error["code"], error["param"]) == (
        request_id,
        "unsupported_parameter",
        "n",
    )
    (letter,) = await collect(stack.bootstrap, topics.dead_letter, lambda seen: len(seen) >= 1)
    assert "parameter 'n'" in letter["reason"] and letter["error_type"] == "Refused"
    assert letter["source_topic"] == topics.tier("narrow")
    assert json.loads(letter["payload"])["request"]["request_id"] == request_id
