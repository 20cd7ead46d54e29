"""Model capabilities: the config's word over litellm's map, unknown as unable, and which model
of a tier can take which request."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.v1 import ChatRequest
from services.common.capabilities import (
    MissingCapability,
    TierCapabilities,
    litellm_entry,
    needs,
    of,
)
from services.common.routing_config import ModelSpec, TierSpec

TOOL = {"type": "function", "function": {"name": "lookup"}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "t", "schema": {}}}
IMAGE = [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]


def request(content: Any = "hi", **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": content}], **fields}
    )


def test_litellm_map_is_read_with_or_without_the_provider_prefix() -> None:
    assert litellm_entry("openai/gpt-4o-mini") == litellm_entry("gpt-4o-mini") is not None
    assert litellm_entry("openai/sim-light") is None
    known = of(ModelSpec(model="openai/gpt-4o-mini"))
    assert known.tools and known.json_schema and known.vision
    assert known.context_window == litellm_entry("gpt-4o-mini")["max_input_tokens"]  # type: ignore[index]


def test_the_config_overrides_the_map_and_unknown_is_unable() -> None:
    unknown = of(ModelSpec(model="openai/sim-light"))
    assert not (unknown.tools or unknown.json_schema or unknown.vision)
    assert unknown.context_window is None
    declared = of(
        ModelSpec.model_validate(
            {"model": "openai/sim-light", "capabilities": {"tools": True, "context_window": 10}}
        )
    )
    assert declared.tools and not declared.json_schema and declared.context_window == 10
    narrowed = of(
        ModelSpec.model_validate({"model": "openai/gpt-4o", "capabilities": {"vision": False}})
    )
    assert narrowed.tools and not narrowed.vision


def test_what_a_request_needs() -> None:
    assert needs(request()).capabilities == ()
    assert needs(request(tools=[TOOL])).capabilities == ("tools",)
    assert needs(request(tools=[TOOL], tool_choice="none")).capabilities == ()
    assert needs(request(response_format={"type": "json_object"})).capabilities == ()
    assert needs(request(response_format=SCHEMA_FORMAT)).capabilities == ("json_schema",)
    assert needs(request(IMAGE, tools=[TOOL])).capabilities == ("tools", "vision")
    # litellm's default tokenizer (cl100k_base): ten tokens, where characters / 4 says 11
    assert needs(request("The quick brown fox jumps over the lazy dog.")).prompt_tokens == 10


def tier(*models: dict[str, Any]) -> TierSpec:
    return TierSpec.model_validate({"models": [{"model": "openai/sim", **m} for m in models]})


def test_a_tier_takes_a_request_one_of_its_models_can_take() -> None:
    mixed = TierCapabilities(
        "mixed", tier({"name": "a"}, {"name": "b", "capabilities": {"tools": True}})
    )
    mixed.check(request(tools=[TOOL]))
    mixed.check(request())


@pytest.mark.parametrize(
    ("fields", "capability", "param"),
    [
        ({"tools": [TOOL]}, "tools", "tools"),
        ({"response_format": SCHEMA_FORMAT}, "json_schema", "response_format"),
        ({"content": IMAGE}, "vision", "messages"),
        ({"content": "word " * 1_200}, "context_window", "messages"),
    ],
)
def test_a_tier_none_of_whose_models_can_refuses_by_name(
    fields: dict[str, Any], capability: str, param: str
) -> None:
    plain = TierCapabilities(
        "plain",
        tier(
            {"name": "a", "capabilities": {"context_window": 1000}},
            {"name": "b", "capabilities": {"context_window": 1000}},
        ),
    )
    content = fields.pop("content", "hi")
    with pytest.raises(MissingCapability) as refused:
        plain.check(request(content, **fields))
    assert (refused.value.capability, refused.value.param) == (capability, param)
    assert "tier 'plain' (a, b)" in str(refused.value)
