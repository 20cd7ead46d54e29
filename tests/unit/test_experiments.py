"""Experiments in the routing config, and who goes to the candidate (services/common/experiments.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.control import ExperimentState
from schemas.v1 import ChatRequest
from services.common import experiments
from services.common.control import LiveExperiments, share_in_force
from services.common.routing_config import ConfigError, LoadedConfig, load_config

ROOT = Path(__file__).resolve().parents[2]

BASE = """
tiers:
  fast:
    models: [{model: openai/sim-light}]
  balanced:
    models: [{model: openai/sim-balanced}]
default: balanced
experiments:
  next:
    tier: balanced
    candidate: {model: openai/sim-balanced-next, name: next-model}
    steps: [5, 25, 100]
    criteria: ["error_rate <= baseline.error_rate + 0.01", "p95_latency_ms < 300"]
    rollback_when: ["error_rate > 0.5"]
"""


def load(tmp_path: Path, text: str) -> LoadedConfig:
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    return load_config(path)


def chat(tenant: str | None = None, **fields: object) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "user", "content": "hello"}], metadata={"tenant": tenant}, **fields
    )


def test_example_config_loads() -> None:
    config = load_config(ROOT / "config" / "examples" / "canary.yaml")
    experiment = config.experiments["balanced-next"]
    assert experiment.spec.tier == "balanced"
    assert experiment.spec.start_share == 5
    assert config.experiment_of_tier["balanced"] is experiment


def test_experiment_compiles(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    experiment = config.experiments["next"]
    assert experiment.candidate == "next-model"
    assert experiment.spec.start_share == 5
    figures = {"error_rate": 0.01, "baseline.error_rate": 0.0, "p95_latency_ms": 200.0}
    assert all(c.matches(figures) for c in experiment.criteria)
    assert not experiment.criteria[1].matches({**figures, "p95_latency_ms": 300.0})
    assert not experiment.criteria[1].matches({})  # no figure: never holds


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        (("tier: balanced", "tier: nope"), "experiments.next.tier", "unknown tier 'nope'"),
        (("steps: [5, 25, 100]", "steps: [25, 5]"), "experiments.next.steps", "must rise"),
        (("steps: [5, 25, 100]", "steps: [0, 5]"), "experiments.next.steps", "above 0"),
        (("    steps:", "    share: 7\n    steps:"), "experiments.next", "not one of the steps"),
        (
            (
                'criteria: ["error_rate <= baseline.error_rate + 0.01", "p95_latency_ms < 300"]',
                "criteria: []",
            ),
            "experiments.next",
            "a canary needs at least one criterion",
        ),
        (
            ('"p95_latency_ms < 300"', '"p96_latency_ms < 300"'),
            "experiments.next.criteria[1]",
            "unknown field 'p96_latency_ms'",
        ),
        (
            ('"error_rate > 0.5"', '"tags.x == 1"'),
            "experiments.next.rollback_when[0]",
            "unknown field 'tags.x'",
        ),
        (("    steps:", "    sticky: cookie\n    steps:"), "experiments.next.sticky", "Input"),
        (("    steps:", "    max_in_flight: 4\n    steps:"), "experiments.next", "max_in_flight"),
        (("  next:", "  Next:"), "experiments.Next", "name must match"),
        (("    steps:", "    bogus: 1\n    steps:"), "experiments.next.bogus", "unknown key"),
    ],
)
def test_bad_experiment_names_its_key(
    tmp_path: Path, change: tuple[str, str], key: str, reason: str
) -> None:
    assert change[0] in BASE
    with pytest.raises(ConfigError) as err:
        load(tmp_path, BASE.replace(change[0], change[1], 1))
    assert err.value.key == key
    assert reason in err.value.reason


def test_one_experiment_per_tier(tmp_path: Path) -> None:
    second = BASE.split("experiments:")[1].replace("  next:", "  other:")
    with pytest.raises(ConfigError) as err:
        load(tmp_path, BASE + second)
    assert err.value.key == "experiments.other.tier"
    assert "already runs experiment 'next'" in err.value.reason


@pytest.mark.parametrize(
    ("request_", "sticky", "key"),
    [
        (chat("acme"), "tenant", "tenant:acme"),
        (chat(None, request_id="r1"), "tenant", "request:r1"),
        (chat("acme", user="u1"), "user", "user:u1"),
        (
            ChatRequest(
                messages=[{"role": "user", "content": "x"}], metadata={"tags": {"user": "u2"}}
            ),
            "user",
            "user:u2",
        ),
        (
            ChatRequest(
                messages=[{"role": "user", "content": "x"}],
                metadata={"tags": {"conversation_id": "c9"}},
            ),
            "conversation",
            "conversation:c9",
        ),
        (chat("acme", request_id="r2"), "request", "request:r2"),
    ],
)
def test_sticky_key(request_: ChatRequest, sticky: experiments.Sticky, key: str) -> None:
    assert experiments.sticky_key(request_, sticky) == key


@given(st.text(min_size=1, max_size=30), st.floats(0, 100), st.floats(0, 100))
def test_raising_the_share_only_moves_keys_to_the_candidate(key: str, a: float, b: float) -> None:
    low, high = sorted((a, b))
    before = experiments.variant("next", key, low)
    after = experiments.variant("next", key, high)
    assert not (before == "candidate" and after == "baseline")
    assert experiments.variant("next", key, low) == before  # the same key, the same variant


def test_shares_split_keys_as_asked() -> None:
    keys = [f"tenant:{i}" for i in range(20_000)]
    for share in (1, 5, 25, 50):
        chosen = sum(experiments.variant("next", k, share) == "candidate" for k in keys)
        assert abs(chosen / len(keys) * 100 - share) < 1.0, share
    assert all(experiments.variant("next", k, 100) == "candidate" for k in keys[:500])
    assert not any(experiments.variant("next", k, 0) == "candidate" for k in keys[:500])


def test_experiments_split_independently() -> None:
    keys = [f"tenant:{i}" for i in range(4_000)]
    a = {k for k in keys if experiments.variant("one", k, 50) == "candidate"}
    b = {k for k in keys if experiments.variant("two", k, 50) == "candidate"}
    assert 0.4 < len(a & b) / len(a) < 0.6  # unrelated halves, not the same half


def state(config: LoadedConfig, **fields: object) -> ExperimentState:
    values: dict[str, object] = {
        "experiment": "next",
        "candidate": "next-model",
        "share_pct": 25.0,
        "step": 1,
        "status": "running",
        **fields,
    }
    return ExperimentState.model_validate(values)


def test_share_in_force(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    experiment = config.experiments["next"]
    assert share_in_force(experiment, None) == 5
    assert share_in_force(experiment, state(config)) == 25
    assert share_in_force(experiment, state(config, status="paused")) == 25
    assert share_in_force(experiment, state(config, status="rolled_back", share_pct=0)) == 0
    # a state about another candidate (the config changed): the config's start
    assert share_in_force(experiment, state(config, candidate="older")) == 5


def test_live_tags_only_the_experiment_tier(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    states: dict[str, ExperimentState] = {}
    live = LiveExperiments(config, states)
    assert live.tag("fast", chat("acme")) is None
    tag = live.tag("balanced", chat("acme"))
    assert tag is not None and (tag.name, tag.share_pct) == ("next", 5)
    states["next"] = state(config, share_pct=100.0, step=2, status="completed")
    tag = live.tag("balanced", chat("acme"))
    assert tag is not None and tag.variant == "candidate" and tag.share_pct == 100
    states["next"] = state(config, share_pct=0.0, step=-1, status="rolled_back")
    assert live.tag("balanced", chat("acme")) is None


def test_feedback_is_refused_for_another_tenant_or_an_unknown_request() -> None:
    from datetime import UTC, datetime, timedelta

    from schemas.control import Feedback
    from services.common.sql import tenant_hash
    from services.metrics.domain.records import NotYet, feedback_refusals

    now = datetime.now(UTC)
    old = now - timedelta(minutes=5)
    known = {"r1": tenant_hash("acme"), "r2": ""}
    batch = [
        Feedback(request_id="r1", tenant="acme", score=1),
        Feedback(request_id="r1", tenant="globex", score=1),
        Feedback(request_id="r2", score=0.5),
        Feedback(request_id="r2", tenant="acme", score=0.5),
        Feedback(request_id="gone", score=0.5, at=old),
    ]
    reasons = feedback_refusals(batch, known, now)
    assert reasons[0] is None and reasons[2] is None
    assert "not made for this tenant" in (reasons[1] or "") and reasons[3]
    assert "no request 'gone'" in (reasons[4] or "")
    with pytest.raises(NotYet):  # a moment after its answer, the request's row may be on its way
        feedback_refusals([Feedback(request_id="new", score=1)], known, now)


@pytest.mark.parametrize(
    ("config", "simulated"),
    [
        ("config/examples/canary.yaml", True),  # its models are the simulator's
        ("config/simulated.yaml", True),
        ("config/switchboard.yaml", False),
    ],
)
def test_make_up_starts_the_simulator_for_a_config_that_uses_it(
    config: str, simulated: bool
) -> None:
    from switchboard.up import plan_from_env

    plan = plan_from_env({"SWITCHBOARD_CONFIG": str(ROOT / config)})
    assert plan.simulated is simulated
