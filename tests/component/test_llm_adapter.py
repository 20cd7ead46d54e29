"""The workers' model adapter against the provider simulator, on both of its transports.

The direct transport (litellm's provider config + the worker's own HTTP pool) must give the same
answer, usage and cost as ``litellm.acompletion``, and map every provider failure to the same
error kinds, including a stream cut before its end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import litellm
import pytest

from schemas.v1 import ChatRequest, Usage
from services.common.routing_config import ModelCapabilities, ModelSpec
from services.workers.adapters.llm import (
    LiteLLMClient,
    _direct_route,
    cost_usd,
    supported_parameters,
)
from services.workers.errors import (
    AdapterError,
    BadRequest,
    ModelNotFound,
    ModelTimeout,
    ProviderUnavailable,
    RateLimited,
)
from tests.component.test_simulator import LITELLM_WARNINGS, running_simulator

pytestmark = LITELLM_WARNINGS

REQUEST = ChatRequest.model_validate(
    {
        "model": "auto",
        "messages": [{"role": "user", "content": "Which queue does a refund request go to?"}],
        "max_tokens": 12,
    }
)


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    with running_simulator() as (base, _):
        yield base


@pytest.fixture
async def client() -> AsyncIterator[LiteLLMClient]:
    c = LiteLLMClient()
    yield c
    await c.aclose()
    from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

    await close_litellm_async_clients()
    litellm.in_memory_llm_clients_cache.flush_cache()


def spec(simulator: str, model: str = "sim-light", **extra: Any) -> ModelSpec:
    return ModelSpec(
        model=f"openai/{model}", api_base=f"{simulator}/v1", price_as="gpt-4o-mini", **extra
    )


async def queue(simulator: str, kind: str) -> None:
    async with httpx.AsyncClient(base_url=simulator) as http:
        response = await http.post("/simulator/faults", json={"kind": kind, "count": 1})
        response.raise_for_status()


def test_openai_compatible_endpoints_take_the_direct_transport() -> None:
    assert _direct_route("openai/sim-light", "http://127.0.0.1:1/v1") is not None
    assert _direct_route("hosted_vllm/llama-3", "http://127.0.0.1:1/v1") is not None
    direct = _direct_route("openai/gpt-4o-mini", None)
    assert direct is not None and direct.url == "https://api.openai.com/v1/chat/completions"
    assert _direct_route("anthropic/claude-haiku-4-5", None) is None


async def test_both_transports_give_the_same_answer(simulator: str, client: LiteLLMClient) -> None:
    direct = await client.complete(spec(simulator), REQUEST, 10)
    via_litellm = await client.complete(spec(simulator, transport="litellm"), REQUEST, 10)
    for c in (direct, via_litellm):
        assert c.text.startswith("Simulated answer from sim-light")
        assert c.body["choices"][0]["finish_reason"] == "length"
        assert c.ttft_ms is not None and 0 < c.ttft_ms <= c.latency_ms
    assert direct.text == via_litellm.text
    assert direct.usage == via_litellm.usage
    assert direct.usage.completion_tokens == 12 and direct.usage.prompt_tokens > 0
    assert direct.cost_usd == pytest.approx(via_litellm.cost_usd) and direct.cost_usd > 0
    assert direct.body["object"] == "chat.completion" and direct.body["id"]


@pytest.mark.parametrize(
    ("kind", "error"),
    [("429", RateLimited), ("500", ProviderUnavailable), ("disconnect", ProviderUnavailable)],
)
async def test_direct_transport_maps_provider_faults(
    simulator: str, client: LiteLLMClient, kind: str, error: type[Exception]
) -> None:
    await queue(simulator, kind)
    with pytest.raises(error):
        await client.complete(spec(simulator, "sim-balanced"), REQUEST, 10)


async def test_direct_transport_times_out_and_knows_unknown_models(
    simulator: str, client: LiteLLMClient
) -> None:
    await queue(simulator, "timeout")
    with pytest.raises(ModelTimeout):
        await client.complete(spec(simulator), REQUEST, 0.5)
    with pytest.raises(ModelNotFound):
        await client.complete(spec(simulator, "gpt-9"), REQUEST, 10)
    # The pool is still usable after a timed-out and a refused call.
    assert (await client.complete(spec(simulator), REQUEST, 10)).text


def test_cost_from_the_price_map_matches_litellm() -> None:
    usage = Usage(prompt_tokens=1234, completion_tokens=567, total_tokens=1801)
    prompt, completion = litellm.cost_per_token(
        model="gpt-4o-mini", prompt_tokens=1234, completion_tokens=567
    )
    model = ModelSpec(model="openai/sim-light", price_as="gpt-4o-mini")
    assert cost_usd(model, usage) == pytest.approx(prompt + completion)
    unknown = ModelSpec(model="openai/sim-light", price_as="no-such-model")
    assert cost_usd(unknown, usage) == 0.0


@pytest.mark.parametrize(
    ("transport", "target"),
    [
        ("auto", "litellm.llms.openai.chat.gpt_transformation.OpenAIGPTConfig.map_openai_params"),
        ("litellm", "services.workers.adapters.llm._StreamState.add"),
        ("auto", "services.workers.adapters.llm._StreamState.add"),
    ],
)
async def test_a_failure_on_our_side_of_the_call_is_permanent(
    simulator: str,
    client: LiteLLMClient,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
    target: str,
) -> None:
    # mapping the parameters (direct) or folding the stream (litellm) raising must not look
    # like an outage: the tier policy would call the same model again, paid, for ever
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("choices")

    monkeypatch.setattr(target, broken)
    with pytest.raises(AdapterError) as caught:
        await client.complete(spec(simulator, transport=transport), REQUEST, 10)
    assert not caught.value.transient and "KeyError" in str(caught.value)


async def test_sampling_parameters_reach_the_model(
    simulator: str, client: LiteLLMClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from litellm.llms.openai.chat.gpt_transformation import OpenAIGPTConfig

    sent: list[dict[str, Any]] = []
    transform, acompletion = OpenAIGPTConfig.transform_request, litellm.acompletion

    def spy_transform(self: Any, *args: Any, **kwargs: Any) -> Any:
        optional = kwargs["optional_params"] if "optional_params" in kwargs else args[2]
        sent.append(dict(optional))
        return transform(self, *args, **kwargs)

    async def spy_acompletion(**kwargs: Any) -> Any:
        sent.append(kwargs)
        return await acompletion(**kwargs)

    monkeypatch.setattr(OpenAIGPTConfig, "transform_request", spy_transform)
    monkeypatch.setattr(litellm, "acompletion", spy_acompletion)
    wanted = {"seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5}
    request = REQUEST.model_copy(update=wanted)
    for transport in ("auto", "litellm"):
        sent.clear()
        answer = await client.complete(spec(simulator, transport=transport), request, 10)
        assert answer.text
        assert sent and all(sent[0].get(k) == v for k, v in wanted.items()), (transport, sent)


@pytest.mark.parametrize("transport", ["auto", "litellm"])
async def test_several_choices_and_their_logprobs_come_back_whole(
    simulator: str, client: LiteLLMClient, transport: str
) -> None:
    request = REQUEST.model_copy(update={"n": 2, "logprobs": True, "top_logprobs": 2})
    answer = await client.complete(spec(simulator, transport=transport), request, 10)
    choices = answer.body["choices"]
    assert [c["index"] for c in choices] == [0, 1], answer.body
    assert all(c["finish_reason"] == "length" for c in choices)
    texts = [c["message"]["content"] for c in choices]
    assert texts[0] != texts[1] and answer.text == texts[0]
    for choice in choices:
        entries = choice["logprobs"]["content"]
        assert "".join(e["token"] for e in entries) == choice["message"]["content"]
        assert all(len(e["top_logprobs"]) == 2 for e in entries)
    assert answer.usage.completion_tokens == 24


def test_the_parameters_a_model_takes_are_litellms_plus_the_configs() -> None:
    openai_model = ModelSpec(model="openai/gpt-4o-mini")
    assert {"n", "logit_bias", "logprobs", "user"} <= supported_parameters(openai_model)
    assert "metadata" not in supported_parameters(openai_model)  # litellm lists it for none
    mistral = ModelSpec(model="mistral/mistral-small-latest")
    assert not {"logit_bias", "n", "logprobs"} & supported_parameters(mistral)
    declared = ModelSpec(
        model="mistral/mistral-small-latest",
        capabilities=ModelCapabilities(params=("metadata", "user")),
    )
    assert {"metadata", "user"} <= supported_parameters(declared)


@pytest.mark.parametrize("transport", ["auto", "litellm"])
async def test_declared_parameters_litellm_does_not_know_are_sent_as_they_are(
    simulator: str, client: LiteLLMClient, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # litellm's list for an unknown OpenAI model lacks `user`, and it lists `metadata` for no
    # model: the config says this one takes both, so both reach the provider's body
    bodies: list[dict[str, Any]] = []
    original = httpx.AsyncClient.send

    async def spy(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> Any:
        if request.url.path.endswith("/chat/completions"):
            bodies.append(json.loads(request.content))
        return await original(self, request, **kwargs)

    import aiohttp

    post = aiohttp.ClientSession._request

    async def spy_aiohttp(self: Any, method: str, url: Any, **kwargs: Any) -> Any:
        if str(url).endswith("/chat/completions") and "json" in kwargs:
            bodies.append(kwargs["json"])
        return await post(self, method, url, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", spy)
    monkeypatch.setattr(aiohttp.ClientSession, "_request", spy_aiohttp)
    request = REQUEST.model_copy(
        update={
            "user": "agent-7",
            "metadata": REQUEST.metadata.model_validate({"tenant": "acme", "ticket": "T-1"}),
        }
    )
    declared = ModelCapabilities(params=("user", "metadata"))
    answer = await client.complete(
        spec(simulator, transport=transport, capabilities=declared), request, 10
    )
    assert answer.text
    (body,) = bodies
    assert body["user"] == "agent-7" and body["metadata"] == {"ticket": "T-1"}, body


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}, "urgent": {"type": "boolean"}},
            "required": ["order_id", "urgent"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TRIAGE = {
    "type": "object",
    "properties": {
        "queue": {"type": "string", "enum": ["billing", "refunds", "bugs"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["queue", "priority", "tags"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("transport", ["auto", "litellm"])
async def test_a_tool_call_comes_back_whole_then_the_tool_result_gets_text(
    simulator: str, client: LiteLLMClient, transport: str
) -> None:
    asking = ChatRequest.model_validate(
        {**REQUEST.model_dump(exclude_none=True), "tools": [LOOKUP]}
    )
    first = await client.complete(spec(simulator, transport=transport), asking, 10)
    choice = first.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", first.body
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "lookup_order"
    arguments = json.loads(call["function"]["arguments"])
    assert set(arguments) == {"order_id", "urgent"} and isinstance(arguments["urgent"], bool)
    assert first.usage.completion_tokens > 0

    answered = ChatRequest.model_validate(
        {
            "messages": [
                *REQUEST.model_dump(exclude_none=True)["messages"],
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": '{"status": "shipped"}'},
            ],
            "tools": [LOOKUP],
            "max_tokens": 12,
        }
    )
    second = await client.complete(spec(simulator, transport=transport), answered, 10)
    assert second.body["choices"][0]["finish_reason"] == "length"
    assert second.text.startswith("Simulated answer")
    assert not second.body["choices"][0]["message"].get("tool_calls")


@pytest.mark.parametrize("transport", ["auto", "litellm"])
async def test_a_json_schema_answer_validates_against_the_schema(
    simulator: str, client: LiteLLMClient, transport: str
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    request = ChatRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "Triage: my refund has not arrived"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "triage", "schema": TRIAGE, "strict": True},
            },
        }
    )
    answer = await client.complete(spec(simulator, transport=transport), request, 10)
    value = json.loads(answer.text)
    jsonschema.validate(value, TRIAGE)
    assert value["queue"] == "billing" and 1 <= value["priority"] <= 5


@pytest.mark.parametrize("transport", ["auto", "litellm"])
async def test_a_schema_the_model_cannot_use_is_a_permanent_bad_request(
    simulator: str, client: LiteLLMClient, transport: str
) -> None:
    broken = {"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}, "required": ["a"]}
    request = ChatRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "t", "schema": broken},
            },
        }
    )
    with pytest.raises(BadRequest) as refused:
        await client.complete(spec(simulator, transport=transport), request, 10)
    assert not refused.value.transient and "response_format" in str(refused.value)
