"""The routing config file: tiers, their models, ordered rules, default and fallback tiers.

Loaded once at start-up into frozen models. Any problem (unknown key, unknown tier, bad regex, bad
condition) raises ``ConfigError`` naming the file, the key path and the reason. The config hash
(sha256 of the file's canonical content, before environment interpolation) is stamped on every
routed message, result and metrics row.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.topics import valid_tier_name
from schemas.v1 import AUTO_MODEL
from services.common.conditions import Condition, ConditionError, compile_condition
from services.common.experiments import FIGURES, Sticky
from services.common.route_classifier import ClassifierFile

_ENV_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    def __init__(self, path: str | Path, key: str, reason: str) -> None:
        self.path, self.key, self.reason = str(path), key, reason
        super().__init__(f"{path}: {key}: {reason}" if key else f"{path}: {reason}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelCapabilities(_Strict):
    """What a model can do, where litellm's model map does not know it or is wrong about it.
    Unset fields come from the map (services/common/capabilities.py); unknown means unable."""

    tools: bool | None = Field(default=None, description="Function calling (tools).")
    json_schema: bool | None = Field(
        default=None, description="Answers held to a JSON Schema (response_format json_schema)."
    )
    vision: bool | None = Field(default=None, description="Image inputs.")
    context_window: int | None = Field(default=None, gt=0, description="Input tokens at most.")
    params: tuple[str, ...] = Field(
        default=(),
        description="OpenAI parameters the model takes besides those litellm lists for its "
        "provider (e.g. `user`, `metadata`); they are sent as they are.",
    )


class ModelSpec(_Strict):
    """One model a tier can call, in the order the tier tries them."""

    model: str = Field(description="litellm model string, e.g. 'openai/gpt-4o-mini'.")
    name: str | None = Field(default=None, description="Label in headers and rows; default: model.")
    api_base: str | None = Field(default=None, description="Endpoint override; ${ENV} allowed.")
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the key (never the key).",
    )
    price_as: str | None = Field(
        default=None, description="litellm price-map entry used for cost_usd; default: model."
    )
    input_cost_per_mtok: float | None = Field(default=None, ge=0)
    output_cost_per_mtok: float | None = Field(default=None, ge=0)
    timeout_s: float | None = Field(default=None, gt=0, description="Overrides the tier's.")
    transport: Literal["auto", "litellm"] = Field(
        default="auto",
        description=(
            "auto: OpenAI-compatible endpoints (openai/, hosted_vllm/) are streamed over the "
            "worker's own connection pool, with litellm's provider config shaping the request "
            "and parsing the stream; every other provider goes through litellm.acompletion. "
            "litellm: always litellm.acompletion."
        ),
    )

    capabilities: ModelCapabilities | None = Field(
        default=None, description="Overrides litellm's model map: tools, json_schema, vision."
    )
    aliases: tuple[str, ...] = Field(
        default=(),
        description="Other names a request's `model` may pin this model by (its label and its "
        "litellm model string pin it too).",
    )
    pinned_fallback: bool = Field(
        default=False,
        description="A request pinned to this model may fall back to the tier's other models "
        "(and the fallback tier) when it fails; by default only this model answers it.",
    )

    @property
    def label(self) -> str:
        return self.name or self.model

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else "openai"


# What a refusal or an admission of doubt looks like (the verifier's default phrases).
REFUSALS = (
    r"\bI(?:'| a)?m (?:sorry|afraid)\b",
    r"\bI (?:cannot|can't|can not|am unable to|'m unable to|won't be able to) "
    r"(?:help|answer|assist|do that|comply|provide|be (?:sure|certain))",
    r"\bI(?:'| a)?m not (?:sure|certain|able)\b",
    r"\bI (?:do not|don't) know\b",
    r"\bI cannot be certain\b",
    r"\bas an AI\b",
)


class JudgeSpec(_Strict):
    """A model that scores the draft against a rubric (0 to 10), asked for JSON."""

    model: ModelSpec
    rubric: str = Field(min_length=1, description="What a good answer does; the judge's brief.")
    min_score: float = Field(default=7, ge=0, le=10, description="Lowest score accepted.")


class VerifySpec(_Strict):
    """The checks a draft must pass to be the answer; the first that fails is the reason."""

    json_valid: bool = Field(
        default=True,
        description="When the request asks for JSON, the draft must parse (and match its "
        "JSON Schema, for response_format json_schema).",
    )
    refusals: tuple[str, ...] | bool = Field(
        default=True,
        description="Regexes of refusal and uncertainty phrases (true: the built-in ones; "
        "false: none); a draft matching one is rejected.",
    )
    min_chars: int = Field(default=1, ge=0, description="Shortest answer accepted.")
    max_chars: int | None = Field(default=None, ge=1, description="Longest answer accepted.")
    must_match: tuple[str, ...] = Field(default=(), description="Regexes the answer must match.")
    must_not_match: tuple[str, ...] = Field(
        default=(), description="Regexes the answer must not match."
    )
    min_mean_logprob: float | None = Field(
        default=None,
        le=0,
        description="Lowest mean token log probability accepted; the draft is asked for "
        "logprobs, and the check is passed over where the provider returns none.",
    )
    judge: JudgeSpec | None = Field(
        default=None, description="A model that scores drafts the other checks passed."
    )

    @field_validator("must_match", "must_not_match")
    @classmethod
    def _regexes(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regex {pattern!r}: {exc}") from exc
        return patterns

    @property
    def refusal_patterns(self) -> tuple[str, ...]:
        if self.refusals is True:
            return REFUSALS
        return () if self.refusals is False else self.refusals


class CascadeSpec(_Strict):
    """A draft model answers first; a draft the verifier rejects goes to the tier's models."""

    draft: ModelSpec
    verify: VerifySpec = Field(default_factory=VerifySpec)


class TierSpec(_Strict):
    description: str = ""
    kind: Literal["models", "cascade"] = Field(
        default="models",
        description="models: the models in order; cascade: `cascade.draft` first, and the "
        "models (the escalation) only for a draft the verifier rejects.",
    )
    cascade: CascadeSpec | None = Field(default=None, description="For kind: cascade.")
    interactive: bool = Field(
        default=False,
        description="Callers wait on it: consumers poll with a short fetch wait (lower latency, more idle CPU).",
    )
    models: list[ModelSpec] = Field(min_length=1)
    timeout_s: float = Field(default=60.0, gt=0, description="Per-attempt timeout.")
    retries_per_model: int = Field(
        default=1, ge=0, le=10, description="Extra tries on transient errors."
    )
    retry_backoff_s: float = Field(default=0.2, ge=0)
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="Time budget when the request names no deadline."
    )
    concurrency: int = Field(
        default=256, ge=1, le=10_000, description="In-flight calls per worker."
    )

    @model_validator(mode="after")
    def _cascade(self) -> TierSpec:
        if (self.kind == "cascade") != (self.cascade is not None):
            raise ValueError("cascade: give it exactly when kind is cascade")
        return self


class RuleSpec(_Strict):
    name: str = Field(min_length=1)
    when: str = Field(min_length=1, description="A condition in the rule language.")
    tier: str
    capture: bool = Field(
        default=False,
        description="Keep the inputs and outputs of the requests this rule routes, redacted "
        "(llm_payloads).",
    )
    after_semantic: bool = Field(
        default=False,
        description="Tried only when the semantic stage did not decide (no route at or above "
        "its threshold); without it a matching rule wins before the semantic stage runs.",
    )


class SemanticRoute(_Strict):
    """A route of the semantic stage: requests like these go to ``tier``."""

    tier: str
    utterances: list[str] = Field(min_length=1, description="Example requests of this route.")
    threshold: float | None = Field(
        default=None, gt=0, le=1, description="This route's own threshold (else the stage's)."
    )


class SemanticSpec(_Strict):
    """The semantic stage: after the rules, a request goes to the route its text is closest
    to, when the score reaches the threshold (README "Semantic routing")."""

    model: Literal["all-MiniLM-L6-v2"] = Field(
        default="all-MiniLM-L6-v2", description="The sentence encoder (the `semantic` extra)."
    )
    threshold: float = Field(
        default=0.5, gt=0, le=1, description="Lowest score that decides; below it, the default."
    )
    top_k: int = Field(
        default=3, ge=1, le=50, description="A route's score: the mean of its top_k utterances."
    )
    routes: dict[str, SemanticRoute] = Field(
        default_factory=dict, description="Routes by name, each with example utterances."
    )
    classifier: str | None = Field(
        default=None,
        description="A file from `switchboard train` (relative to this config), used instead "
        "of routes.",
    )
    max_tokens: int = Field(
        default=128, ge=8, le=256, description="Tokens of the request's text the encoder reads."
    )
    precision: Literal["int8", "fp32"] = Field(
        default="int8",
        description="int8: matrix weights quantized, a decision 2.5 times cheaper; fp32: the "
        "model's own vectors. A classifier must be trained at the precision it serves with.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SemanticSpec:
        if bool(self.routes) == bool(self.classifier):
            raise ValueError("semantic: give either routes (example utterances) or a classifier")
        for name in self.routes:
            if not valid_tier_name(name):
                raise ValueError(f"semantic.routes: name {name!r} must match [a-z][a-z0-9_-]*")
        return self


class CaptureSpec(_Strict):
    """Whose requests are kept, redacted, in llm_payloads (besides rules with `capture`)."""

    tenants: tuple[str, ...] = Field(
        default=(), description="Tenants (metadata.tenant) whose every request is captured."
    )


SHADOW_SHARE = 10.0  # % of a tier mirrored by a shadow experiment that names no share


_CANARY_ONLY = frozenset(
    {"steps", "criteria", "rollback_when", "min_samples", "interval_s", "confidence"}
)
_SHADOW_ONLY = frozenset({"max_in_flight", "max_lag_s", "judge"})


class ExperimentSpec(_Strict):
    """A candidate model tried on a share of one tier's traffic, moved step by step by the
    controller while its criteria hold, and rolled back when a rollback condition is met
    (docs/experiments.md)."""

    tier: str = Field(description="The tier whose traffic the candidate takes a share of.")
    candidate: ModelSpec = Field(description="Any model entry, as in a tier's `models`.")
    mode: Literal["canary", "shadow"] = Field(
        default="canary",
        description="canary: the candidate answers its share of the requests (the tier's models "
        "remain its fallback). shadow: the tier answers every request, and its share is also "
        "sent to the candidate, off the client's path, and compared.",
    )
    steps: tuple[float, ...] = Field(
        default=(1, 5, 25, 50, 100),
        min_length=1,
        description="The shares, in %, a promotion moves through, rising; the last one ends it.",
    )
    share: float | None = Field(
        default=None,
        description="Canary: the share to start at, one of `steps` (default the first); 0 "
        "starts it stopped, for an operator's promote. Shadow: the share mirrored.",
    )
    sticky: Sticky = Field(
        default="tenant",
        description="What keeps a caller on one variant: tenant, user (OpenAI `user` or tag "
        "`user`), conversation (tag `conversation_id`), or request.",
    )
    criteria: tuple[str, ...] = Field(
        default=(),
        description="Conditions over the window's figures (services/common/experiments.py "
        "FIGURES; `baseline.` for the tier's models); all must hold to promote. A canary "
        "needs at least one.",
    )
    rollback_when: tuple[str, ...] = Field(
        default=(),
        description="Conditions over the same figures; any that holds rolls back to 0 % at once.",
    )
    min_samples: int = Field(
        default=100,
        ge=1,
        le=10_000_000,
        description="Requests each variant needs in the window before a promotion.",
    )
    interval_s: float = Field(
        default=60.0, ge=1, le=86_400, description="How often the controller evaluates."
    )
    confidence: float = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        description="Of the bounds on the candidate's error rate and latency quantiles: a "
        "promotion needs the pessimistic bound to pass, a rollback the optimistic one to fail.",
    )

    max_in_flight: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="Shadow: candidate calls at once per shadow worker; a mirrored request "
        "arriving while they are all busy is dropped and counted.",
    )
    max_lag_s: float = Field(
        default=60.0,
        gt=0,
        description="Shadow: a mirrored request that waited longer than this for the shadow "
        "worker is dropped and counted (the candidate fell behind).",
    )
    judge: ModelSpec | None = Field(
        default=None,
        description="Shadow: a model that scores how alike the two answers are (0..1); "
        "default: a text similarity measure.",
    )

    @field_validator("steps")
    @classmethod
    def _rising(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError("every step is a share in % above 0 and at most 100")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must rise: {list(steps)}")
        return steps

    @model_validator(mode="after")
    def _start(self) -> ExperimentSpec:
        # a key the mode does not use is refused by name rather than ignored
        unused = _CANARY_ONLY if self.mode == "shadow" else _SHADOW_ONLY
        if given := sorted(unused & self.model_fields_set):
            raise ValueError(f"{given[0]}: not used by a {self.mode} experiment")
        if self.mode == "canary" and not self.criteria:
            raise ValueError("criteria: a canary needs at least one criterion to promote by")
        if self.share is not None and not 0 <= self.share <= 100:
            raise ValueError(f"share: {self.share} is not a share in % (0 to 100)")
        if self.mode == "canary" and self.share not in (None, 0, *self.steps):
            raise ValueError(f"share: {self.share} is not one of the steps {list(self.steps)}")
        return self

    @property
    def start_share(self) -> float:
        if self.share is not None:
            return self.share
        return self.steps[0] if self.mode == "canary" else SHADOW_SHARE


class RoutingConfig(_Strict):
    version: int = 1
    tiers: dict[str, TierSpec] = Field(min_length=1)
    rules: list[RuleSpec] = Field(default_factory=list)
    experiments: dict[str, ExperimentSpec] = Field(
        default_factory=dict, description="Canaries by name, at most one per tier."
    )
    capture: CaptureSpec = Field(
        default_factory=CaptureSpec,
        description="Opt-in capture of inputs and outputs, redacted; off unless named here or "
        "on a rule.",
    )
    semantic: SemanticSpec | None = Field(
        default=None, description="The semantic stage, after the rules; none: rules only."
    )
    default: str
    fallback: str | None = Field(
        default=None,
        description="Tier that takes a request whose own tier failed on every model with transient errors.",
    )

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, TierSpec]) -> dict[str, TierSpec]:
        for name in tiers:
            if not valid_tier_name(name):
                raise ValueError(f"tier name {name!r} must match [a-z][a-z0-9_-]* (max 40)")
        return tiers

    @model_validator(mode="after")
    def _references(self) -> RoutingConfig:
        if self.default not in self.tiers:
            raise ValueError(f"default: unknown tier {self.default!r}")
        if self.fallback is not None and self.fallback not in self.tiers:
            raise ValueError(f"fallback: unknown tier {self.fallback!r}")
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.tier not in self.tiers:
                raise ValueError(f"rules[{i}].tier: unknown tier {rule.tier!r}")
            if rule.name in seen:
                raise ValueError(f"rules[{i}].name: duplicate rule name {rule.name!r}")
            seen.add(rule.name)
        for name, route in (self.semantic.routes if self.semantic else {}).items():
            if route.tier not in self.tiers:
                raise ValueError(f"semantic.routes.{name}.tier: unknown tier {route.tier!r}")
        self.pins()  # names that pin a model are unambiguous
        tiers_taken: dict[str, str] = {}
        for name, experiment in self.experiments.items():
            where = f"experiments.{name}"
            if not valid_tier_name(name):
                raise ValueError(f"{where}: name must match [a-z][a-z0-9_-]* (max 40)")
            if experiment.tier not in self.tiers:
                raise ValueError(f"{where}.tier: unknown tier {experiment.tier!r}")
            if experiment.tier in tiers_taken:
                raise ValueError(
                    f"{where}.tier: tier {experiment.tier!r} already runs experiment "
                    f"{tiers_taken[experiment.tier]!r} (one per tier)"
                )
            tiers_taken[experiment.tier] = name
        return self

    def pins(self) -> dict[str, Pin]:
        """Every name a request's ``model`` may pin a model by: its label, its litellm model
        string, its aliases. A model in several tiers is pinned through the first tier that
        tries it first, else the first that lists it. Raises ``ValueError`` for a name that is a
        tier's, or that names two different models."""
        out: dict[str, Pin] = {}
        listed = [
            (tier_name, j, model)
            for tier_name, tier in self.tiers.items()
            for j, model in enumerate(tier.models)
        ]
        for tier_name, j, model in sorted(listed, key=lambda entry: entry[1] > 0):
            for name in (model.label, model.model, *model.aliases):
                where = f"tiers.{tier_name}.models[{j}]"
                if name in self.tiers or name == AUTO_MODEL:
                    raise ValueError(
                        f"{where}: {name!r} names a model and a tier (or switchboard/auto); "
                        "a request's model would be ambiguous: rename one"
                    )
                known = out.get(name)
                if known is not None and known.label != model.label:
                    raise ValueError(
                        f"{where}: {name!r} names both {known.label!r} and {model.label!r}"
                    )
                out.setdefault(name, Pin(tier_name, model.label))
        return out


@dataclass(frozen=True)
class Pin:
    """Where a model name sends a request: the tier it goes through, and the model's label."""

    tier: str
    label: str


@dataclass(frozen=True)
class Experiment:
    """An experiment with its conditions compiled."""

    name: str
    spec: ExperimentSpec
    criteria: tuple[Condition, ...]
    rollback_when: tuple[Condition, ...]

    @property
    def candidate(self) -> str:
        return self.spec.candidate.label


class LoadedConfig:
    """A validated config with its compiled rules and hash. Immutable by convention."""

    def __init__(
        self,
        path: Path,
        spec: RoutingConfig,
        config_hash: str,
        rules: tuple[tuple[RuleSpec, Condition], ...],
        experiments: tuple[Experiment, ...] = (),
        classifier: ClassifierFile | None = None,
    ) -> None:
        self.path = path
        self.classifier = classifier  # semantic.classifier, read
        self.spec = spec
        self.hash = config_hash
        self.rules = rules
        # without a semantic stage, after_semantic changes nothing: every rule, in order
        late = spec.semantic is not None
        self.rules_before = tuple(r for r in rules if not (late and r[0].after_semantic))
        self.rules_after = tuple(r for r in rules if late and r[0].after_semantic)
        self.pins = spec.pins()
        self.experiments = {e.name: e for e in experiments}
        self.experiment_of_tier = {e.spec.tier: e for e in experiments}
        self._capture_rules = frozenset(r.name for r, _ in rules if r.capture)
        self._capture_tenants = frozenset(spec.capture.tenants)

    def captures(self, tenant: str | None, rule: str) -> bool:
        """Does this request's input and output go to llm_payloads? Off unless opted in."""
        return rule in self._capture_rules or (
            tenant is not None and tenant in self._capture_tenants
        )

    def tier(self, name: str) -> TierSpec:
        return self.spec.tiers[name]

    def model_named(self, name: str) -> ModelSpec | None:
        """A model entry by any name a request may pin it by, or an experiment's candidate by
        its label or litellm string (a candidate need not be in any tier)."""
        pin = self.pins.get(name)
        if pin is not None:
            return next(m for m in self.tier(pin.tier).models if m.label == pin.label)
        for experiment in self.experiments.values():
            if name in (experiment.spec.candidate.label, experiment.spec.candidate.model):
                return experiment.spec.candidate
        return None

    @property
    def model_names(self) -> list[str]:
        """The labels ``model_named`` knows, tiers' models first."""
        labels = [m.label for t in self.spec.tiers.values() for m in t.models]
        labels += [e.candidate for e in self.experiments.values()]
        return list(dict.fromkeys(labels))

    @property
    def tier_names(self) -> list[str]:
        return list(self.spec.tiers)


def _interpolate(value: Any, path: Path, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, path, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, path, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(path, key, f"environment variable {name} is not set")

        return _ENV_REF.sub(sub, value)
    return value


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def config_hash(raw: Any) -> str:
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_config(path: str | Path) -> LoadedConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from exc
    return load_config_text(text, path)


def load_config_text(text: str, path: str | Path) -> LoadedConfig:
    """A config from its text; ``path`` names where it came from in errors (a file, or e.g.
    ``control topic (applied by ...)``)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(path, "", "the top level must be a mapping")
    try:
        spec = RoutingConfig.model_validate(_interpolate(raw, path, ""))
    except ValidationError as exc:
        errors = exc.errors()
        # A typo shows as "unknown key" plus "missing field": the unknown key is the cause.
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        msg = err["msg"].removeprefix("Value error, ")
        key = _key_path(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif ": " in msg and not key:
            key, msg = msg.split(": ", 1)
        raise ConfigError(path, key, msg) from exc
    compiled: list[tuple[RuleSpec, Condition]] = []
    for i, rule in enumerate(spec.rules):
        try:
            compiled.append((rule, compile_condition(rule.when)))
        except ConditionError as exc:
            raise ConfigError(path, f"rules[{i}].when", f"{exc} in {rule.when!r}") from exc
    experiments = tuple(
        _compile_experiment(path, name, experiment) for name, experiment in spec.experiments.items()
    )
    classifier = _classifier(path, spec)
    digest = config_hash(raw)
    if classifier is not None:  # a retrained file is another config
        digest = config_hash({"config": digest, "classifier": classifier.digest})
    return LoadedConfig(path, spec, digest, tuple(compiled), experiments, classifier)


def _classifier(path: Path, spec: RoutingConfig) -> ClassifierFile | None:
    """``semantic.classifier`` read and checked against the tiers; relative to the config."""
    if spec.semantic is None or spec.semantic.classifier is None:
        return None
    where = Path(spec.semantic.classifier)
    if not where.is_absolute() and path.is_file():
        where = path.parent / where
    try:
        classifier = ClassifierFile.read(where)
    except ValueError as exc:
        raise ConfigError(path, "semantic.classifier", str(exc)) from exc
    stage = spec.semantic
    wrong = []
    if classifier.model != stage.model:
        wrong.append(
            f"{where} was trained on {classifier.model!r} vectors, the stage uses {stage.model!r}"
        )
    if classifier.precision != stage.precision:
        wrong.append(
            f"{where} was trained on {classifier.precision} vectors, the stage runs at "
            f"{stage.precision} (set semantic.precision, or train again)"
        )
    wrong += [
        f"{where}: route {route!r} names unknown tier {tier!r}"
        for route, tier in classifier.routes
        if tier not in spec.tiers
    ]
    if wrong:
        raise ConfigError(path, "semantic.classifier", wrong[0])
    return classifier


def _compile_experiment(path: Path, name: str, spec: ExperimentSpec) -> Experiment:
    compiled: dict[str, list[Condition]] = {"criteria": [], "rollback_when": []}
    for key, conditions in compiled.items():
        for i, source in enumerate(getattr(spec, key)):
            try:
                conditions.append(compile_condition(source, FIGURES, tags=False))
            except ConditionError as exc:
                where = f"experiments.{name}.{key}[{i}]"
                raise ConfigError(path, where, f"{exc} in {source!r}") from exc
    return Experiment(name, spec, tuple(compiled["criteria"]), tuple(compiled["rollback_when"]))
