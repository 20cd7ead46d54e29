"""Version 1 of the control plane's messages: experiment state and the controller's decisions.

Flow::

    controller / `switchboard canary` ──▶ ExperimentState   (control topic, compacted: the last
                                     │                       record of each experiment counts)
                                     └─▶ ControlDecision    (decisions topic ─metrics─▶ ClickHouse
                                                             switchboard.decisions)
    tier worker, a mirrored request answered ──▶ ShadowRequest   (shadow topic)
    `switchboard replay`, a captured input ──▶ ShadowRequest     (shadow topic, with its Replay)
    shadow worker, the candidate called ──▶ ShadowComparison     (shadow comparisons topic
                                                                  ─metrics─▶ llm_shadow)
    `switchboard config apply FILE` ──▶ ConfigUpdate             (config topic, compacted: every
                                                                  service applies the newest)
    router (input) / worker (output), capture on ──▶ CapturedPayload  (payloads topic ─metrics─▶
                                                                  llm_payloads; redacted first)
    POST /v1/feedback, a judge, a verifier ──▶ Feedback          (feedback topic ─metrics─▶
                                                                  llm_feedback, once checked)

Routers read the control topic from its start and apply the newest state of each experiment:
its share says which requests go to the candidate (services/common/experiments.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from schemas.v1 import MAX_NAME, SCHEMA_VERSION, RoutedRequest, _Message, utcnow

# running: the controller moves the share by the criteria; paused: nobody moves it but an
# operator; rolled_back: share 0 until an operator promotes again; completed: the last step held
ExperimentStatus = Literal["running", "paused", "rolled_back", "completed"]
Action = Literal["start", "promote", "hold", "rollback", "complete", "pause", "resume"]


class ExperimentState(_Message):
    """Where one experiment stands: the share in force and why (keyed by the experiment name)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    experiment: str = Field(min_length=1, max_length=MAX_NAME)
    candidate: str = Field(
        min_length=1,
        max_length=200,
        description="The candidate's label: a state about another candidate (the config "
        "changed) is not applied.",
    )
    share_pct: float = Field(ge=0, le=100, allow_inf_nan=False)
    step: int = Field(ge=-1, description="Index into the experiment's steps; -1 after a rollback.")
    status: ExperimentStatus
    since: datetime = Field(
        default_factory=utcnow, description="When this share took effect: the window's start."
    )
    version: int = Field(default=0, ge=0, description="+1 per change; the newest wins.")
    reason: str = Field(default="", max_length=2000)
    by: str = Field(default="", max_length=200, description="Controller instance or 'operator'.")


class ControlDecision(_Message):
    """One evaluation of an experiment, and what came of it (a row of switchboard.decisions)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    decision_id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=100)
    decided_at: datetime = Field(default_factory=utcnow)
    experiment: str = Field(min_length=1, max_length=MAX_NAME)
    tier: str = Field(max_length=100)
    candidate: str = Field(max_length=200)
    action: Action
    share_from: float = Field(ge=0, le=100, allow_inf_nan=False)
    share_to: float = Field(ge=0, le=100, allow_inf_nan=False)
    reason: str = Field(max_length=4000)
    criteria: list[str] = Field(default_factory=list, description="Each criterion and its verdict.")
    figures: dict[str, Any] = Field(
        default_factory=dict, description="The window's figures per variant, as evaluated."
    )
    by: str = Field(default="", max_length=200)
    config_hash: str = Field(default="", max_length=100)


BaselineStatus = Literal["ok", "error", "unknown"]


class BaselineAnswer(_Message):
    """What the tier's own model answered a mirrored request: the shadow call is compared with it."""

    model: str = Field(max_length=200)
    latency_ms: float = Field(ge=0, allow_inf_nan=False)
    tokens_in: int = Field(ge=0)
    tokens_out: int = Field(ge=0)
    cost_usd: float = Field(ge=0, allow_inf_nan=False)
    response_sha256: str = Field(max_length=64)
    text: str = Field(description="The answer's text, cut at SHADOW_TEXT_CHARS.")
    answered_at: datetime = Field(default_factory=utcnow)
    status: BaselineStatus = Field(
        default="ok",
        description="A replay's baseline may have failed (error), or have left no event "
        "(unknown); a live mirror's always answered.",
    )


REPLAY_PREFIX = "replay-"  # the experiment column of a replay's comparisons: replay-<run>
MAX_RUN = MAX_NAME - len(REPLAY_PREFIX)
AgainstKind = Literal["model", "tier", "config"]


class Replay(_Message):
    """What makes a mirrored request a replay (``switchboard replay``): which run it belongs to
    and what it is replayed against. The shadow worker resolves the candidate with its own
    config and environment, as it does a live shadow's."""

    run: str = Field(min_length=1, max_length=MAX_RUN, pattern=r"^[A-Za-z0-9._-]+$")
    kind: AgainstKind
    against: str = Field(
        min_length=1, max_length=1000, description="A model label, a tier, or the config's path."
    )
    config_text: str | None = Field(
        default=None,
        max_length=1_000_000,
        description="kind config: the file's text; each request goes where that config "
        "routes it, to its tier's first model (or the model it pins).",
    )
    tenant_hash: str = Field(default="", max_length=64, description="The original's.")
    source: Literal["captured", "kafka"] = Field(
        description="Where the input came from: llm_payloads (redacted) or a tier topic."
    )
    sent_at: datetime = Field(default_factory=utcnow)

    @property
    def experiment(self) -> str:
        return REPLAY_PREFIX + self.run


SHADOW_TEXT_CHARS = 32_000  # of each answer, for the similarity measure


class ShadowRequest(_Message):
    """A request the tier answered, to be sent to the shadow candidate too (the shadow topic)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    routed: RoutedRequest
    baseline: BaselineAnswer
    replay: Replay | None = Field(default=None, description="Set by `switchboard replay`.")


ShadowOutcome = Literal["compared", "candidate_failed", "dropped"]


class ShadowComparison(_Message):
    """One mirrored request: the candidate's call beside the baseline's (a row of llm_shadow)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    comparison_id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=100)
    ts: datetime = Field(default_factory=utcnow)
    experiment: str = Field(min_length=1, max_length=MAX_NAME)
    tier: str = Field(max_length=100)
    request_id: str = Field(max_length=200)
    share_pct: float = Field(ge=0, le=100, allow_inf_nan=False)
    outcome: ShadowOutcome
    reason: str = Field(default="", max_length=1000, description="Why dropped, or the error.")
    baseline_model: str = Field(max_length=200)
    candidate_model: str = Field(max_length=200)
    baseline_latency_ms: float = Field(ge=0, allow_inf_nan=False)
    candidate_latency_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    baseline_tokens_in: int = Field(default=0, ge=0)
    candidate_tokens_in: int | None = Field(default=None, ge=0)
    baseline_tokens_out: int = Field(ge=0)
    candidate_tokens_out: int | None = Field(default=None, ge=0)
    baseline_cost_usd: float = Field(ge=0, allow_inf_nan=False)
    candidate_cost_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    same_response: bool | None = Field(default=None, description="Equal response hashes.")
    similarity: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    similarity_by: str = Field(default="", max_length=200, description="'text' or the judge.")
    baseline_status: BaselineStatus = "ok"
    slices: list[str] = Field(
        default_factory=list,
        max_length=10,
        description="The request's slices (short, long, long conversation, multimodal, noisy "
        "or truncated): what `switchboard replay report` groups by.",
    )


class Feedback(_Message):
    """A score or label for one answered request (POST /v1/feedback, or the feedback topic):
    what ``accuracy`` and ``accuracy_delta`` are made of. A row of llm_feedback once the metrics
    service has checked that the request exists and is the tenant's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    feedback_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=100)
    request_id: str = Field(min_length=1, max_length=200)
    tenant: str | None = Field(
        default=None, max_length=200, description="The tenant the request was made for, if any."
    )
    score: float | None = Field(
        default=None, ge=0, le=1, allow_inf_nan=False, description="0 (wrong) to 1 (right)."
    )
    label: str | None = Field(default=None, min_length=1, max_length=100)
    comment: str = Field(default="", max_length=2000)
    source: str = Field(
        default="api",
        min_length=1,
        max_length=100,
        description="Who scored: api, a person's tool, or e.g. judge:<model> / verifier:<name>.",
    )
    at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _says_something(self) -> Feedback:
        if self.score is None and self.label is None:
            raise ValueError("send a score (0 to 1), a label, or both")
        return self


MAX_CONFIG_BYTES = 1_000_000


class ConfigUpdate(_Message):
    """A routing config applied to the fleet (``switchboard config apply FILE``): the config
    topic, one partition, compacted; every router, worker, controller and shadow worker applies
    the newest record, each validating it first with its own environment."""

    schema_version: Literal[1] = SCHEMA_VERSION
    text: str = Field(max_length=MAX_CONFIG_BYTES, description="The file's text, as written.")
    config_hash: str = Field(max_length=100, description="Its hash, as `check-config` prints it.")
    source: str = Field(default="", max_length=1000, description="The file it was read from.")
    by: str = Field(default="", max_length=200)
    at: datetime = Field(default_factory=utcnow)


PayloadKind = Literal["input", "output"]


class CapturedPayload(_Message):
    """A captured request or answer, redacted where it was captured (a row of llm_payloads).

    ``input`` (written by the router): the request as a replay re-sends it, messages redacted;
    ``output`` (written by the worker that answered): the answer's text, redacted."""

    schema_version: Literal[1] = SCHEMA_VERSION
    payload_id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=100)
    ts: datetime = Field(default_factory=utcnow)
    request_id: str = Field(min_length=1, max_length=200)
    tenant_hash: str = Field(default="", max_length=64)
    tier: str = Field(max_length=100)
    rule: str = Field(default="", max_length=200)
    config_hash: str = Field(default="", max_length=100)
    model: str = Field(default="", max_length=200, description="output: the model that answered")
    kind: PayloadKind
    text: str = Field(description="input: the request JSON; output: the answer text")
    redactions: dict[str, int] = Field(default_factory=dict, description="Replaced, by kind.")
