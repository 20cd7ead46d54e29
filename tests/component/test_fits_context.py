"""A request longer than a model's context window never goes to it: another tier, or a 400."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.topics import Topics
from schemas.v1 import ChatRequest
from services.common.capabilities import MissingCapability
from services.common.routing_config import load_config
from services.router.domain.classify import classify
from services.router.service import Router

CONFIG = """
tiers:
  small:
    models:
      - {model: openai/sim-light, name: little, capabilities: {context_window: 1000}}
  big:
    models:
      - {model: openai/sim-reasoning, name: roomy, capabilities: {context_window: 5000}}
rules:
  - {name: pinned-small, when: 'task == "small"', tier: small}
  - {name: too-long, when: "not fits_context", tier: big}
default: small
"""


@pytest.fixture
def router(tmp_path: Path) -> Router:
    path = tmp_path / "routing.yaml"
    path.write_text(CONFIG)
    return Router(load_config(path), Topics("ctx-test"), publisher=None)  # type: ignore[arg-type]


def chat(words: int, **metadata: object) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "word " * words}], metadata=metadata)


def test_fits_context_is_a_rule_field(router: Router) -> None:
    assert classify(chat(500), router.config).rule == "default"
    assert classify(chat(1_500), router.config).rule == "too-long"  # over the smallest window


def test_a_tier_none_of_whose_models_fit_hands_the_request_to_one_that_does(
    router: Router,
) -> None:
    routed = router.route(chat(1_500, task="small"), "replies")
    assert (routed.tier, routed.rule) == ("big", "fits_context")
    assert router.route(chat(500, task="small"), "replies").tier == "small"


def test_too_long_for_every_model_is_refused_naming_the_largest_window(router: Router) -> None:
    with pytest.raises(MissingCapability) as refused:
        router.route(chat(8_000, task="small"), "replies")
    message = str(refused.value)
    assert refused.value.param == "messages"
    assert "5,000 tokens (roomy)" in message and "about 8,0" in message


def test_a_pinned_model_is_not_moved(router: Router) -> None:
    with pytest.raises(MissingCapability, match=r"context window is 1,000 tokens \(little\)"):
        router.route(chat(1_500).model_copy(update={"model": "little"}), "replies")


def test_a_tier_the_caller_named_is_not_swapped(router: Router) -> None:
    with pytest.raises(MissingCapability, match=r"context window is 1,000 tokens \(little\)"):
        router.route(chat(1_500).model_copy(update={"model": "small"}), "replies")
