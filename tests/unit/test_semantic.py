"""The semantic stage's decision: scoring, thresholds, rule order, and its config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from schemas.v1 import ChatRequest
from services.common.route_classifier import DIMENSIONS, KNOWN_SIGNALS, ClassifierFile
from services.common.routing_config import ConfigError, load_config
from services.router.domain.classify import Pending, classify
from services.router.domain.semantic import (
    EDGE_CHARS,
    Match,
    RouteClassifier,
    RouteIndex,
    signal_vector,
    text_of,
)

CONFIG = """
tiers:
  fast: {models: [{model: openai/sim-light}]}
  slow: {models: [{model: openai/sim-reasoning}]}
rules:
  - {name: pinned-task, when: 'task == "reasoning"', tier: slow}
  - {name: short, when: "len(prompt) < 20", tier: fast, after_semantic: true}
semantic:
  threshold: 0.5
  routes:
    maths: {tier: slow, utterances: ["solve 2x + 1 = 5"]}
    support: {tier: fast, utterances: ["reset my password"], threshold: 0.8}
default: slow
"""


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIMENSIONS, np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def chat(text: str, **meta: object) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], metadata=meta)


def test_a_route_scores_the_mean_of_its_nearest_utterances() -> None:
    vectors = np.stack([unit(1, 0), unit(1, 0.2), unit(0, 1), unit(0.1, 1)])
    index = RouteIndex([("a", "fast", 0.5), ("b", "slow", 0.5)], vectors, [0, 0, 1, 1], top_k=1)
    [match] = index.best(unit(1, 0.1)[None, :])
    assert (match.route, match.tier, match.rule) == ("a", "fast", "semantic:a")
    assert match.score == pytest.approx(float(unit(1, 0.1) @ unit(1, 0)), abs=1e-3) or (
        match.score == pytest.approx(float(unit(1, 0.1) @ unit(1, 0.2)), abs=1e-3)
    )
    two = RouteIndex([("a", "fast", 0.5), ("b", "slow", 0.5)], vectors, [0, 0, 1, 1], top_k=2)
    scores = two.scores(unit(1, 0)[None, :])[0]
    want = (1 + float(unit(1, 0) @ unit(1, 0.2))) / 2
    assert scores[0] == pytest.approx(want, abs=1e-5)


def test_top_k_past_a_routes_size_takes_all_its_utterances() -> None:
    vectors = np.stack([unit(1, 0), unit(0, 1)])
    index = RouteIndex([("a", "fast", 0.5), ("b", "slow", 0.5)], vectors, [0, 1], top_k=5)
    assert index.scores(unit(1, 0)[None, :])[0][0] == pytest.approx(1.0)


def test_a_classifier_reads_signals_after_the_vector() -> None:
    routes = [("easy", "fast", 0.5), ("hard", "slow", 0.5)]
    weights = np.zeros((2, DIMENSIONS + 1), np.float32)
    weights[1, -1] = 20  # only the signal decides
    classifier = RouteClassifier(routes, weights, np.zeros(2, np.float32), ["has_math"])
    v = unit(1)[None, :]
    assert classifier.best(v, np.array([[0.0]], np.float32))[0].route == "easy"
    hard = classifier.best(v, np.array([[1.0]], np.float32))[0]
    assert hard.route == "hard" and hard.score > 0.99
    with pytest.raises(ValueError, match="reads the signals has_math"):
        classifier.best(v)


def test_signal_vector_scales_each_signal() -> None:
    values = {"has_code": True, "has_math": False, "reasoning_markers": 9, "prompt_chars": 0}
    got = signal_vector(values.__getitem__, ["has_code", "has_math", "reasoning_markers"])
    assert got.tolist() == [0.5, 0.0, 0.5]


def test_a_long_message_is_read_at_both_ends() -> None:
    text = "A" * EDGE_CHARS + "middle" * 500 + "Z" * EDGE_CHARS
    read = text_of(chat(text))
    assert read.startswith("A" * EDGE_CHARS) and read.endswith("Z" * EDGE_CHARS)
    assert "middle" not in read
    assert text_of(chat("short")) == "short"


def load(tmp_path: Path, text: str = CONFIG) -> object:
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    return load_config(path)


def fixed(route: str, tier: str, score: float, threshold: float = 0.5):  # type: ignore[no-untyped-def]
    def lookup(pending: Pending) -> Match:
        return Match(route, tier, score, threshold)

    return lookup


@pytest.mark.parametrize(
    ("request_", "lookup", "tier", "rule", "score"),
    [
        # a rule before the stage wins, and the stage does not run
        (chat("x", task="reasoning"), fixed("support", "fast", 0.99), "slow", "pinned-task", None),
        # the stage decides at or above its threshold, before the rules after it
        (chat("short"), fixed("support", "fast", 0.9), "fast", "semantic:support", 0.9),
        (chat("short"), fixed("maths", "slow", 0.5), "slow", "semantic:maths", 0.5),
        # below it: the rules after the stage, then the default; the score is kept
        (chat("short"), fixed("maths", "slow", 0.49), "fast", "short", 0.49),
        (chat("a longer message here"), fixed("maths", "slow", 0.2), "slow", "default", 0.2),
        # no stage at hand: as if it matched nothing
        (chat("short"), None, "fast", "short", None),
    ],
)
def test_order_rules_stage_later_rules_default(
    tmp_path: Path, request_: ChatRequest, lookup: object, tier: str, rule: str, score: object
) -> None:
    decision = classify(request_, load(tmp_path), lookup)  # type: ignore[arg-type]
    assert (decision.tier, decision.rule, decision.score) == (tier, rule, score)


def test_without_a_stage_after_semantic_rules_keep_their_place(tmp_path: Path) -> None:
    text = CONFIG.split("\nsemantic:")[0] + "\ndefault: slow\n"
    config = load(tmp_path, text)
    assert classify(chat("short"), config).rule == "short"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("section", "key", "reason"),
    [
        ("semantic: {routes: {}}", "semantic", "either routes"),
        (
            "semantic: {routes: {m: {tier: nowhere, utterances: [x]}}}",
            "semantic.routes.m.tier",
            "unknown tier",
        ),
        (
            "semantic: {routes: {m: {tier: fast, utterances: []}}}",
            "semantic.routes.m.utterances",
            "",
        ),
        (
            "semantic: {threshold: 1.5, routes: {m: {tier: fast, utterances: [x]}}}",
            "semantic.threshold",
            "",
        ),
        (
            "semantic: {routes: {m: {tier: fast, utterances: [x]}}, typo: 1}",
            "semantic.typo",
            "unknown key",
        ),
        ("semantic: {classifier: missing.json}", "semantic.classifier", "cannot read"),
    ],
)
def test_bad_semantic_sections_fail_naming_the_key(
    tmp_path: Path, section: str, key: str, reason: str
) -> None:
    text = "tiers:\n  fast: {models: [{model: openai/sim-light}]}\ndefault: fast\n" + section
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert err.value.key == key or err.value.key.startswith(key)
    assert reason in str(err.value)


def classifier_file(tmp_path: Path, tier: str = "fast", width: int = DIMENSIONS) -> Path:
    c = ClassifierFile(
        "all-MiniLM-L6-v2",
        [("support", tier), ("other", "fast")],
        np.zeros((2, width), np.float32),
        np.zeros(2, np.float32),
        {"items": 2},
        KNOWN_SIGNALS[: width - DIMENSIONS],
    )
    path = tmp_path / "routes.json"
    c.write(path)
    return path


def test_a_classifier_file_is_read_relative_to_the_config_and_hashed(tmp_path: Path) -> None:
    classifier_file(tmp_path, width=DIMENSIONS + 2)
    text = "tiers:\n  fast: {models: [{model: openai/sim-light}]}\ndefault: fast\n"
    config = load(tmp_path, text + "semantic: {classifier: routes.json}\n")
    assert config.classifier is not None  # type: ignore[attr-defined]
    assert config.classifier.signals == ("has_code", "has_math")  # type: ignore[attr-defined]
    before = config.hash  # type: ignore[attr-defined]
    data = json.loads((tmp_path / "routes.json").read_text())
    data["bias"] = [0.5, 0.0]
    (tmp_path / "routes.json").write_text(json.dumps(data))
    assert load(tmp_path, text + "semantic: {classifier: routes.json}\n").hash != before  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.update(format="other"), "is not a switchboard-route-classifier/1"),
        (lambda d: d.update(model="bge-small"), "trained on 'bge-small'"),
        (lambda d: d["routes"][0].update(tier="gone"), "unknown tier 'gone'"),
        (lambda d: d.update(signals=["mood"]), "unknown signal mood"),
        (lambda d: d["weights"].pop(), "weights must be 2 rows of 384"),
    ],
)
def test_a_bad_classifier_file_fails_at_load(tmp_path: Path, change: object, reason: str) -> None:
    path = classifier_file(tmp_path)
    data = json.loads(path.read_text())
    change(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))
    text = "tiers:\n  fast: {models: [{model: openai/sim-light}]}\ndefault: fast\n"
    with pytest.raises(ConfigError, match=reason):
        load(tmp_path, text + "semantic: {classifier: routes.json}\n")
