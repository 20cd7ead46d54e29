"""The shipped configs route by the semantic stage: requests with no metadata at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.v1 import ChatRequest
from services.common.routing_config import LoadedConfig, load_config
from services.router.domain.classify import classify
from services.router.stage import SemanticStage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["simulated.yaml", "switchboard.yaml"])
def shipped(request: pytest.FixtureRequest) -> Iterator[tuple[LoadedConfig, SemanticStage]]:
    config = load_config(ROOT / "config" / request.param)
    stage = SemanticStage.for_config(config)
    assert stage is not None, "the shipped config routes with the semantic stage"
    yield config, stage
    stage.close()


@pytest.mark.parametrize(
    ("prompt", "tier", "route"),
    [
        ("Find x if 3x + 7 = 22 and explain each step", "reasoning", "maths"),
        (
            "If all bloops are razzies and some razzies are lazzies, must some bloops be lazzies?",
            "reasoning",
            "reasoning",
        ),
        ("Write a function that returns the longest palindromic substring", "reasoning", "coding"),
        ("How do I change the email address on my account?", "fast", "any"),
        ("My order arrived damaged, can I get a replacement?", "fast", "support_triage"),
    ],
)
def test_a_request_with_no_metadata_goes_where_its_text_says(
    shipped: tuple[LoadedConfig, SemanticStage], prompt: str, tier: str, route: str
) -> None:
    config, stage = shipped
    request = ChatRequest(messages=[{"role": "user", "content": prompt}])
    decision = classify(request, config, stage.matcher(config))
    assert decision.tier == tier
    if route != "any":  # the route the classifier names (any fast route will do for support)
        assert decision.rule == f"semantic:{route}"
    assert decision.rule.startswith("semantic:")
    assert decision.score is not None and decision.score >= config.spec.semantic.threshold  # type: ignore[union-attr]
