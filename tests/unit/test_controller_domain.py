"""The controller's judgement (services/controller/domain.py): bounds, holds, promotions,
rollbacks, and what an operator may do."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.control import ExperimentState
from services.common.routing_config import Experiment, load_config
from services.common.sql import literal
from services.controller import domain
from services.controller.adapters.figures import window_from_rows, window_sql
from services.controller.domain import SideData, Window

CONFIG = """
tiers:
  balanced:
    models: [{model: openai/sim-balanced}]
default: balanced
experiments:
  next:
    tier: balanced
    candidate: {model: openai/sim-balanced-next, name: next-model}
    steps: [5, 25, 100]
    min_samples: 50
    criteria:
      - error_rate <= baseline.error_rate + 0.05
      - p95_latency_ms <= baseline.p95_latency_ms * 1.5
    rollback_when:
      - error_rate > baseline.error_rate + 0.2
"""
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.fixture
def experiment(tmp_path: Path) -> Experiment:
    path = tmp_path / "routing.yaml"
    path.write_text(CONFIG)
    return load_config(path).experiments["next"]


def state(share: float = 5.0, step: int = 0, status: str = "running") -> ExperimentState:
    return ExperimentState(
        experiment="next",
        candidate="next-model",
        share_pct=share,
        step=step,
        status=status,  # type: ignore[arg-type]
        since=NOW,
        version=3,
    )


def side(n: int, errors: int = 0, latency: float = 100.0, seed: int = 1) -> SideData:
    rnd = random.Random(seed)
    answered = n - errors
    return SideData(
        requests=n,
        attempts=n,
        errors=errors,
        tokens=answered * 100,
        cost_usd=answered * 0.0001,
        latencies_ms=[latency * rnd.uniform(0.8, 1.2) for _ in range(answered)],
    )


@pytest.mark.parametrize(
    ("errors", "n", "upper_at_least", "lower_at_most"),
    [(0, 100, 0.0, 0.0), (5, 100, 0.05, 0.05), (50, 100, 0.5, 0.5), (100, 100, 1.0, 1.0)],
)
def test_wilson_brackets_the_rate(
    errors: int, n: int, upper_at_least: float, lower_at_most: float
) -> None:
    z = domain.z_of(0.95)
    upper = domain.wilson(errors, n, z, "upper")
    lower = domain.wilson(errors, n, z, "lower")
    assert upper is not None and lower is not None
    assert lower <= lower_at_most <= upper_at_least <= upper
    assert domain.wilson(0, 0, z, "upper") is None


def test_quantile_bounds_need_enough_samples() -> None:
    z = domain.z_of(0.95)
    ordered = [float(i) for i in range(1, 1001)]
    assert domain.quantile(ordered, 0.95) == 950.0
    upper = domain.quantile_bound(ordered, 0.95, z, "upper")
    lower = domain.quantile_bound(ordered, 0.95, z, "lower")
    assert upper is not None and lower is not None and lower < 950.0 < upper
    few = [1.0, 2.0, 3.0, 4.0, 5.0]  # five samples cannot bound a p95 from above
    assert domain.quantile_bound(few, 0.95, z, "upper") is None


def test_thin_data_holds(experiment: Experiment) -> None:
    verdict = domain.judge(experiment, state(), Window(side(10), side(500)))
    assert verdict.action == "hold"
    assert "insufficient data: candidate 10, baseline 500" in verdict.reason


def test_no_data_never_promotes(experiment: Experiment) -> None:
    verdict = domain.judge(experiment, state(), Window(SideData(), SideData()))
    assert verdict.action == "hold"
    assert verdict.share_to == 5.0


def test_healthy_candidate_is_promoted_step_by_step(experiment: Experiment) -> None:
    verdict = domain.judge(experiment, state(), Window(side(200), side(2000, errors=10)))
    assert (verdict.action, verdict.share_to, verdict.step, verdict.status) == (
        "promote",
        25.0,
        1,
        "running",
    )
    assert all(v.endswith(": pass") for v in verdict.criteria)
    last = domain.judge(experiment, state(25.0, 1), Window(side(200), side(600)))
    assert (last.action, last.share_to, last.status) == ("promote", 100.0, "completed")


def test_slow_candidate_holds_with_the_failing_criterion(experiment: Experiment) -> None:
    verdict = domain.judge(experiment, state(), Window(side(200, latency=400), side(2000)))
    assert verdict.action == "hold"
    assert "p95_latency_ms <= baseline.p95_latency_ms * 1.5" in verdict.reason
    assert verdict.figures["candidate"]["p95_latency_ms"] > 300


def test_marginal_candidate_is_held_by_the_guard(experiment: Experiment) -> None:
    # 5 % errors on 60 requests: the point estimate passes (<= 0 + 0.05), its upper bound does not
    verdict = domain.judge(experiment, state(), Window(side(60, errors=3), side(2000)))
    assert verdict.action == "hold"
    assert verdict.figures["candidate"]["error_rate"] == pytest.approx(0.05)
    assert "error_rate <= baseline.error_rate + 0.05" in verdict.reason


def test_error_spike_rolls_back_at_once(experiment: Experiment) -> None:
    # thin data for a promotion, but 60 % errors is a breach even at its optimistic bound
    verdict = domain.judge(experiment, state(25.0, 1), Window(side(30, errors=18), side(2000)))
    assert (verdict.action, verdict.share_to, verdict.status) == ("rollback", 0.0, "rolled_back")
    assert "error_rate > baseline.error_rate + 0.2" in verdict.reason


def test_noise_does_not_roll_back(experiment: Experiment) -> None:
    # 1 error in 3 requests is 33 %, but its lower bound is under the 20 % line
    verdict = domain.judge(experiment, state(), Window(side(3, errors=1), side(2000)))
    assert verdict.action == "hold"


def test_paused_is_held_but_still_rolled_back(experiment: Experiment) -> None:
    paused = state(status="paused")
    assert domain.judge(experiment, paused, Window(side(200), side(2000))).action == "hold"
    spike = Window(side(100, errors=80), side(2000))
    assert domain.judge(experiment, paused, spike).action == "rollback"


@pytest.mark.parametrize(
    ("before", "action", "share", "status"),
    [
        (state(), "promote", 25.0, "running"),
        (state(25.0, 1), "promote", 100.0, "completed"),
        (state(0.0, -1, "rolled_back"), "promote", 5.0, "running"),
        (state(25.0, 1), "rollback", 0.0, "rolled_back"),
        (state(25.0, 1), "pause", 25.0, "paused"),
        (state(25.0, 1, "paused"), "resume", 25.0, "running"),
    ],
)
def test_operator_actions(
    experiment: Experiment, before: ExperimentState, action: str, share: float, status: str
) -> None:
    verdict = domain.operate(experiment, before, action)  # type: ignore[arg-type]
    after = domain.next_state(before, verdict, "operator", NOW)
    assert (after.share_pct, after.status, after.version) == (share, status, before.version + 1)
    assert verdict.reason.startswith("operator")


@pytest.mark.parametrize(
    ("before", "action"),
    [
        (state(100.0, 2, "completed"), "promote"),
        (state(0.0, -1, "rolled_back"), "resume"),
        (state(status="paused"), "pause"),
    ],
)
def test_operator_actions_that_do_not_apply(
    experiment: Experiment, before: ExperimentState, action: str
) -> None:
    with pytest.raises(domain.NotAllowed):
        domain.operate(experiment, before, action)  # type: ignore[arg-type]


def test_a_new_share_starts_a_new_window(experiment: Experiment) -> None:
    later = datetime(2026, 12, 2, 12, 5, tzinfo=UTC)
    moved = domain.next_state(state(), domain.operate(experiment, state(), "promote"), "c", later)
    assert moved.since == later
    held = domain.next_state(state(), domain.operate(experiment, state(), "pause"), "c", later)
    assert held.since == NOW


def test_window_sql_quotes_what_it_is_given() -> None:
    assert literal("it's \\ here") == "'it\\'s \\\\ here'"
    sql = window_sql("switchboard", "next", "o'model", 5.0, NOW)
    assert "model = 'o\\'model'" in sql
    assert "share_pct = 5.0" in sql
    assert "toDateTime64('2026-12-02 12:00:00.000', 3, 'UTC')" in sql


def test_window_from_rows() -> None:
    columns = ["side", "requests", "attempts", "errors", "tokens", "cost_usd", "latencies", "ttfts"]
    rows = [["candidate", 3, 4, 1, 300, 0.01, [1.0, 2.0, 3.0], []]]
    window = window_from_rows(columns, rows)
    assert window.candidate.requests == 3 and window.candidate.latencies_ms == [1.0, 2.0, 3.0]
    assert window.baseline == SideData()


def scored(side_: SideData, n: int, mean: float, var: float | None) -> SideData:
    from dataclasses import replace

    return replace(side_, feedback=n, score_mean=mean, score_var=var)


def test_accuracy_delta_and_its_bounds() -> None:
    z = domain.z_of(0.95)
    window = Window(scored(side(100), 40, 0.9, 0.04), scored(side(100), 60, 0.8, 0.05))
    point = domain.accuracy_delta(window, z, None)
    pessimistic = domain.accuracy_delta(window, z, "upper")
    optimistic = domain.accuracy_delta(window, z, "lower")
    assert point == pytest.approx(0.1)
    assert pessimistic is not None and optimistic is not None
    assert pessimistic < 0.1 < optimistic
    one_score = Window(scored(side(100), 1, 1.0, None), scored(side(100), 60, 0.8, 0.05))
    assert domain.accuracy_delta(one_score, z, None) == pytest.approx(0.2)
    assert domain.accuracy_delta(one_score, z, "upper") is None  # no spread: no bound
    assert domain.accuracy_delta(Window(side(10), side(10)), z, None) is None


def test_a_criterion_on_accuracy_needs_the_scores(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(CONFIG.replace("      - error_rate <= baseline.error_rate + 0.05\n",
                                   "      - accuracy_delta >= -0.02\n"))  # fmt: skip
    experiment = load_config(path).experiments["next"]
    unscored = domain.judge(experiment, state(), Window(side(200), side(2000)))
    assert unscored.action == "hold" and "accuracy_delta >= -0.02" in unscored.reason
    good = Window(scored(side(200), 80, 0.9, 0.02), scored(side(2000), 300, 0.85, 0.03))
    assert domain.judge(experiment, state(), good).action == "promote"
    worse = Window(scored(side(200), 80, 0.7, 0.02), scored(side(2000), 300, 0.85, 0.03))
    assert domain.judge(experiment, state(), worse).action == "hold"
