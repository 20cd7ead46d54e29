"""Rule decisions on the shipped config, and the features the rules read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schemas.v1 import ChatRequest
from services.common.conditions import FIELDS
from services.router.domain.classify import Features, UnknownModel, classify, features

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> Any:
    from services.common.routing_config import load_config

    return load_config(ROOT / "config" / "simulated.yaml")


def chat(*messages: dict[str, Any], **fields: Any) -> ChatRequest:
    return ChatRequest(messages=list(messages), **fields)


USER_SHORT = {"role": "user", "content": "hi"}
USER_LONG = {"role": "user", "content": "word " * 100}
IMAGE = {
    "role": "user",
    "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
    ],
}


@pytest.mark.parametrize(
    ("request_", "decision"),
    [
        (chat(IMAGE), ("vision", "images")),
        (chat(USER_LONG, metadata={"requires_reasoning": True}), ("reasoning", "reasoning")),
        (chat(USER_SHORT, metadata={"task": "reasoning"}), ("reasoning", "reasoning")),
        (chat(USER_LONG, metadata={"task": "triage"}), ("fast", "triage")),
        (
            chat({"role": "user", "content": "word " * 2100}, metadata={"task": "triage"}),
            ("balanced", "default"),
        ),
        (chat(USER_SHORT), ("fast", "short")),
        (chat(USER_LONG), ("balanced", "default")),
        (chat(USER_LONG, model="reasoning"), ("reasoning", "forced")),
    ],
)
def test_classify(config: Any, request_: ChatRequest, decision: tuple[str, str]) -> None:
    got = classify(request_, config)
    assert (got.tier, got.rule) == decision


def test_unknown_model(config: Any) -> None:
    with pytest.raises(UnknownModel, match="unknown model 'gpt-9'"):
        classify(chat(USER_SHORT, model="gpt-9"), config)


def test_features_are_what_the_condition_language_documents() -> None:
    request = chat(
        {"role": "system", "content": "be brief"},
        IMAGE,
        {"role": "assistant", "content": None},
        {"role": "user", "content": "and now?"},
        max_tokens=64,
        metadata={"tenant": "t1", "task": "chat", "priority": 3, "tags": {"team": "eng"}},
    )
    prompt = "be brief\nwhat is it?\n\nand now?"
    assert features(request) == {
        "prompt": prompt,
        "last_user": "and now?",
        "system": "be brief",
        "prompt_chars": len(prompt),
        "prompt_tokens": 10,  # cl100k_base, litellm's default tokenizer
        "fits_context": True,  # no context window known without a config
        "message_count": 4,
        "image_count": 1,
        "has_images": True,
        "has_tools": False,
        "wants_json": False,
        "requires_reasoning": False,
        "priority": 3,
        "task": "chat",
        "tenant": "t1",
        "model": "switchboard/auto",
        "max_tokens": 64,
        "has_code": False,
        "has_math": False,
        "reasoning_markers": 0,
        "multi_step": False,
        "complexity": 0,
        "user_turns": 2,
        "tags.team": "eng",
    }
    assert {k for k in features(request) if not k.startswith("tags.")} == set(FIELDS)

    tool = {"type": "function", "function": {"name": "lookup"}}
    asks = chat(USER_SHORT, tools=[tool], response_format={"type": "json_object"})
    assert features(asks)["has_tools"] and features(asks)["wants_json"]
    declined = chat(USER_SHORT, tools=[tool], tool_choice="none", response_format={"type": "text"})
    assert not features(declined)["has_tools"] and not features(declined)["wants_json"]
    lazy = Features(request)
    assert lazy.get("tags.missing") is None and lazy.get("nope", "dflt") == "dflt"
    with pytest.raises(KeyError):
        lazy["tags.missing"]


@pytest.mark.parametrize("op", ["<", "<=", ">", ">="])
@pytest.mark.parametrize("words", [1, 40, 499, 500, 501, 3000])
def test_a_token_comparison_the_byte_bound_decides_never_counts(
    op: str, words: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prompt_tokens < N`` on a prompt of fewer than N bytes is true without a tokenizer
    pass; where the bound cannot decide, the count does, and the answer is the same."""
    from services.common import tokens
    from services.common.conditions import compile_condition

    request = chat({"role": "user", "content": " ".join(["word"] * words)})
    exact = tokens.count(request.messages[0].text())
    counted: list[int] = []
    real = tokens.count
    monkeypatch.setattr(tokens, "count", lambda text: counted.append(1) or real(text))
    condition = compile_condition(f"prompt_tokens {op} 500")
    got = condition.matches(Features(request))
    assert got == {"<": exact < 500, "<=": exact <= 500, ">": exact > 500, ">=": exact >= 500}[op]
    hi = len(request.messages[0].text().encode())  # tokens <= bytes
    by_bound = {"<": hi < 500, "<=": hi <= 500, ">": hi <= 500, ">=": hi < 500}[op]
    assert (not counted) == by_bound
