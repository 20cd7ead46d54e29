"""The controller's judgement: a window's figures → promote, hold or roll back. Pure.

The window of a step is every attempt row of the experiment at the share in force since that
share took effect. Each side's figures come from its own rows: the candidate's are the calls of
the candidate model by requests assigned to it, the baseline's those of requests left on the
tier's models.

The statistical guard: the candidate's error rate, latency quantiles and accuracy_delta are each
replaced by a confidence bound before a condition reads them. A promotion reads the pessimistic bound (the
upper one: the criteria must hold even if the candidate is as bad as the data allows), a rollback
reads the optimistic one (the lower one: it happens only when the candidate is bad even at its
best). Too few samples give no bound at all, and a condition on a missing figure is false: so
missing or thin data never promotes, and never rolls back on noise.

* error rate: the Wilson score interval, one-sided at ``confidence``;
* a latency quantile q over n samples: the order statistic at rank
  ``n·q ± z·√(n·q·(1-q))`` (distribution-free: the count of samples under the true quantile is
  binomial), none when that rank falls outside 1..n;
* accuracy_delta: the difference of the mean scores ∓ z standard errors of it (Welch), none
  under two scores on either side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from statistics import NormalDist
from typing import Any, Literal

from schemas.control import Action, ExperimentState, ExperimentStatus
from services.common.routing_config import Experiment

Side = Literal["candidate", "baseline"]
QUANTILES = {"p50_latency_ms": 0.5, "p95_latency_ms": 0.95, "p99_latency_ms": 0.99}
Bound = Literal["upper", "lower"]


@dataclass(frozen=True)
class SideData:
    """One side's rows in the window, as the figures query returns them."""

    requests: int = 0
    attempts: int = 0
    errors: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    latencies_ms: Sequence[float] = ()  # answered calls (a sample, when there are many)
    ttfts_ms: Sequence[float] = ()  # answered streamed calls
    feedback: int = 0  # scores given for the side's requests
    score_mean: float | None = None
    score_var: float | None = None  # sample variance (None under two scores)


@dataclass(frozen=True)
class Window:
    candidate: SideData
    baseline: SideData


def z_of(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def wilson(errors: int, n: int, z: float, bound: Bound) -> float | None:
    if n <= 0:
        return None
    p = errors / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    value = (centre + spread if bound == "upper" else centre - spread) / (1 + z * z / n)
    return min(1.0, max(0.0, value))


def quantile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted samples."""
    if not ordered:
        return None
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def quantile_bound(ordered: Sequence[float], q: float, z: float, bound: Bound) -> float | None:
    n = len(ordered)
    if n == 0:
        return None
    spread = z * math.sqrt(n * q * (1 - q))
    rank = math.ceil(n * q + spread) + 1 if bound == "upper" else math.floor(n * q - spread)
    return ordered[rank - 1] if 1 <= rank <= n else None


def point_figures(data: SideData) -> dict[str, Any]:
    latencies = sorted(data.latencies_ms)
    answered = data.attempts - data.errors
    return {
        "requests": data.requests,
        "attempts": data.attempts,
        "errors": data.errors,
        "error_rate": data.errors / data.attempts if data.attempts else None,
        **{name: quantile(latencies, q) for name, q in QUANTILES.items()},
        "p95_ttft_ms": quantile(sorted(data.ttfts_ms), 0.95),
        "tokens": data.tokens,
        "cost_per_1k": data.cost_usd * 1000 / data.tokens if data.tokens and answered else None,
        "feedback": data.feedback,
        "accuracy": data.score_mean if data.feedback else None,
    }


def bounded_figures(data: SideData, z: float, bound: Bound) -> dict[str, Any]:
    """The point figures with error rate and latency quantiles replaced by their bound."""
    latencies = sorted(data.latencies_ms)
    out = point_figures(data)
    out["error_rate"] = wilson(data.errors, data.attempts, z, bound)
    for name, q in QUANTILES.items():
        out[name] = quantile_bound(latencies, q, z, bound)
    out["p95_ttft_ms"] = quantile_bound(sorted(data.ttfts_ms), 0.95, z, bound)
    return out


def accuracy_delta(window: Window, z: float, bound: Bound | None) -> float | None:
    """The candidate's mean score minus the baseline's; with ``bound``, less (pessimistic,
    "upper" as for error rates) or more (optimistic) by z standard errors of the difference.
    None without scores on both sides, or, bounded, under two scores on either."""
    c, b = window.candidate, window.baseline
    if not c.feedback or not b.feedback or c.score_mean is None or b.score_mean is None:
        return None
    delta = c.score_mean - b.score_mean
    if bound is None:
        return delta
    if c.score_var is None or b.score_var is None or c.feedback < 2 or b.feedback < 2:
        return None
    se = math.sqrt(c.score_var / c.feedback + b.score_var / b.feedback)
    return delta - z * se if bound == "upper" else delta + z * se


def features(candidate: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """What a condition reads: the candidate's figures, and the baseline's as ``baseline.*``."""
    return {**candidate, **{f"baseline.{k}": v for k, v in baseline.items()}}


@dataclass(frozen=True)
class Verdict:
    action: Action
    share_to: float
    step: int
    status: ExperimentStatus
    reason: str
    criteria: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _checked(conditions: Sequence[Any], feats: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(c.source, c.matches(feats)) for c in conditions]


def judge(experiment: Experiment, state: ExperimentState, window: Window) -> Verdict:
    """What to do with a running (or completed) experiment after this window."""
    spec = experiment.spec
    z = z_of(spec.confidence)
    base = point_figures(window.baseline)
    figures = {
        "candidate": point_figures(window.candidate),
        "candidate_upper": bounded_figures(window.candidate, z, "upper"),
        "candidate_lower": bounded_figures(window.candidate, z, "lower"),
        "baseline": base,
    }
    figures["candidate"]["accuracy_delta"] = accuracy_delta(window, z, None)
    for side, bound in (("candidate_upper", "upper"), ("candidate_lower", "lower")):
        figures[side]["accuracy_delta"] = accuracy_delta(window, z, bound)  # type: ignore[arg-type]
    hold = state.share_pct, state.step, state.status
    breaches = _checked(experiment.rollback_when, features(figures["candidate_lower"], base))
    broken = [source for source, held in breaches if held]
    if broken:
        return Verdict(
            "rollback",
            0.0,
            -1,
            "rolled_back",
            "rollback: " + "; ".join(broken) + " (on the candidate's optimistic bounds)",
            [f"rollback_when {s}: {'BREACHED' if h else 'ok'}" for s, h in breaches],
            figures,
        )
    if state.status != "running":
        return Verdict("hold", *hold, f"{state.status}: no promotion", [], figures)
    n_cand, n_base = window.candidate.requests, window.baseline.requests
    needs_baseline = state.share_pct < 100
    if n_cand < spec.min_samples or (needs_baseline and n_base < spec.min_samples):
        reason = (
            f"insufficient data: candidate {n_cand}, baseline {n_base} requests "
            f"(min_samples {spec.min_samples} each)"
        )
        return Verdict("hold", *hold, reason, [], figures)
    checks = _checked(experiment.criteria, features(figures["candidate_upper"], base))
    verdicts = [f"{s}: {'pass' if ok else 'FAIL'}" for s, ok in checks]
    failing = [s for s, ok in checks if not ok]
    if failing:
        reason = "criteria not met: " + "; ".join(failing) + " (on pessimistic bounds)"
        return Verdict("hold", *hold, reason, verdicts, figures)
    return _promotion(spec.steps, state, verdicts, figures)


def _promotion(
    steps: Sequence[float], state: ExperimentState, verdicts: list[str], figures: dict[str, Any]
) -> Verdict:
    nxt = next((i for i, s in enumerate(steps) if s > state.share_pct), None)
    if nxt is None:
        return Verdict(
            "hold", state.share_pct, state.step, "completed", "last step held", verdicts, figures
        )
    last = nxt == len(steps) - 1
    reason = f"criteria met at {_fmt(state.share_pct)} %: promote to {_fmt(steps[nxt])} %"
    if last:
        reason += " (the last step: the experiment is complete)"
    status: ExperimentStatus = "completed" if last else "running"
    return Verdict("promote", steps[nxt], nxt, status, reason, verdicts, figures)


def step_of(steps: Sequence[float], share: float) -> int:
    return steps.index(share) if share in steps else -1


def starting_state(experiment: Experiment, by: str, now: datetime) -> ExperimentState:
    """The state of an experiment the control topic has nothing on yet: its config's start."""
    share = experiment.spec.start_share
    return ExperimentState(
        experiment=experiment.name,
        candidate=experiment.candidate,
        share_pct=share,
        step=step_of(experiment.spec.steps, share),
        status="running" if share > 0 else "paused",
        since=now,
        version=0,
        reason="started from the config" + ("" if share > 0 else " at 0 %: promote to begin"),
        by=by,
    )


class NotAllowed(ValueError):
    """An operator's action that does not apply to the experiment as it stands."""


def operate(experiment: Experiment, state: ExperimentState, action: Action) -> Verdict:
    """An operator's ``switchboard canary promote|rollback|pause|resume``. A shadow experiment
    is only stopped (rollback) and started again (promote, to its config's share)."""
    steps = experiment.spec.steps
    if experiment.spec.mode == "shadow":
        return _operate_shadow(experiment, state, action)
    if action == "promote":
        verdict = _promotion(steps, state, [], {})
        if verdict.action != "promote":
            raise NotAllowed(f"{experiment.name} is at its last step ({_fmt(state.share_pct)} %)")
        return Verdict(
            "promote", verdict.share_to, verdict.step, verdict.status, "operator: " + verdict.reason
        )
    if action == "rollback":
        return Verdict("rollback", 0.0, -1, "rolled_back", "operator: roll back to 0 %")
    if action == "pause":
        if state.status == "paused":
            raise NotAllowed(f"{experiment.name} is paused already")
        reason = f"operator: pause at {_fmt(state.share_pct)} % (the controller holds it there)"
        return Verdict("pause", state.share_pct, state.step, "paused", reason)
    if action == "resume":
        if state.status != "paused" or state.share_pct <= 0:
            raise NotAllowed(
                f"{experiment.name} is {state.status} at {_fmt(state.share_pct)} %: "
                "only a paused experiment with a share resumes (promote starts one at 0 %)"
            )
        return Verdict("resume", state.share_pct, state.step, "running", "operator: resume")
    raise NotAllowed(f"unknown action {action!r}")


def _operate_shadow(experiment: Experiment, state: ExperimentState, action: Action) -> Verdict:
    share = experiment.spec.start_share
    if action == "rollback":
        return Verdict("rollback", 0.0, -1, "rolled_back", "operator: stop mirroring")
    if action == "promote":
        if state.share_pct == share and state.status == "running":
            raise NotAllowed(f"{experiment.name} mirrors {_fmt(share)} % already")
        reason = f"operator: mirror {_fmt(share)} % again"
        return Verdict("promote", share, -1, "running", reason)
    raise NotAllowed(
        f"{experiment.name} is a shadow: `rollback` stops its mirroring, `promote` starts it"
    )


def next_state(state: ExperimentState, verdict: Verdict, by: str, now: datetime) -> ExperimentState:
    """The state after ``verdict``: a new share starts a new window."""
    moved = verdict.share_to != state.share_pct
    return state.model_copy(
        update={
            "share_pct": verdict.share_to,
            "step": verdict.step,
            "status": verdict.status,
            "since": now if moved else state.since,
            "version": state.version + 1,
            "reason": verdict.reason[:2000],
            "by": by,
        }
    )
