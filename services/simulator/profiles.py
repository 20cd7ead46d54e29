"""The simulator's model of a provider, with no web code so it can be unit-tested directly.

A *profile* says how a simulated model behaves: time to first token, generation speed, typical
answer length, jitter, random fault rates, and answer quality per class of prompt (graded in
``quality.py``). From a profile and a request this module derives the *plan* of one completion
(how long, how many tokens, which finish reason) and its deterministic text, so tests and
benchmarks can reason about the simulator's output exactly.

The *fault plan* decides which requests fail: a per-request header wins, then faults queued
through the control API (FIFO), then the profile's seeded random rates. Statistics count what
was served so tests can check that a retry or a fallback really reached the simulator.

Profiles can change at runtime (``LatencyProfile.updated``, behind the control API's
``PATCH /simulator/profiles/{model}``), so a test can make a model slow or error-prone mid-run;
each request reads its model's profile once, so a change applies to the requests that follow it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    model_validator,
)

from services.simulator.quality import PromptClass, QualityRates

# One content chunk every ~30 ms at the profile's nominal speed, like real provider streams.
CHUNK_INTERVAL_S = 0.03
# Tokens per chunk when a profile has no pacing at all (sim-instant).
INSTANT_CHUNK_TOKENS = 16
# What an image part costs in prompt tokens (OpenAI's "low detail" price).
IMAGE_TOKENS = 85
# Characters per prompt token: the usual rule of thumb for English text.
CHARS_PER_TOKEN = 4
SNIPPET_CHARS = 40

FinishReason = Literal["stop", "length"]


class FaultKind(StrEnum):
    """What a faulty request gets instead of a completion."""

    RATE_LIMIT = "429"
    SERVER_ERROR = "500"
    TIMEOUT = "timeout"  # no answer until the client gives up
    DISCONNECT = "disconnect"  # connection closed (streams: after the first chunk)


class LatencyProfile(BaseModel):
    """How one simulated model behaves; total time ≈ ttft_s + output_tokens / tokens_per_s."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ttft_s: float = Field(ge=0, description="Seconds before the first token.")
    tokens_per_s: float = Field(gt=0, description="Generation speed; `.inf` for no pacing.")
    output_tokens: int = Field(ge=1, description="Typical completion length, in tokens.")
    jitter: float = Field(default=0.1, ge=0, lt=1, description="± fraction applied to delays.")
    error_rate_429: float = Field(default=0.0, ge=0, le=1, description="Share of 429 answers.")
    error_rate_500: float = Field(default=0.0, ge=0, le=1, description="Share of 500 answers.")
    timeout_rate: float = Field(default=0.0, ge=0, le=1, description="Share of requests that hang.")
    quality: QualityRates = Field(
        default_factory=QualityRates,
        description="Per class of prompt, the share answered well (a class not given: 1.0).",
    )

    @model_validator(mode="after")
    def _rates_fit(self) -> LatencyProfile:
        if self.error_rate_429 + self.error_rate_500 + self.timeout_rate > 1:
            raise ValueError("error_rate_429 + error_rate_500 + timeout_rate must be <= 1")
        return self

    @field_serializer("tokens_per_s", when_used="json")
    def _finite_speed(self, value: float) -> float | str:
        # JSON has no infinity; "inf" is what the field parses back from.
        return "inf" if math.isinf(value) else value

    def updated(self, changes: Mapping[str, Any]) -> LatencyProfile:
        """This profile with ``changes`` merged over it, validated whole (the rates-sum check
        included); unknown fields, and unknown classes in ``quality``, are refused by name.

        ``quality`` merges class by class, so ``{"quality": {"maths": 0.1}}`` keeps the rates
        of the other classes."""
        merged = {**self.model_dump(), **changes}
        if isinstance(changes.get("quality"), Mapping):
            merged["quality"] = {**self.quality.model_dump(), **changes["quality"]}
        return LatencyProfile.model_validate(merged)

    @property
    def nominal_total_s(self) -> float:
        """Duration of a typical answer at latency_scale 1, without jitter."""
        return self.ttft_s + self.output_tokens / self.tokens_per_s

    @property
    def tokens_per_chunk(self) -> int:
        """Tokens per stream chunk, so chunks leave every ~30 ms rather than one per token."""
        if math.isinf(self.tokens_per_s):
            return INSTANT_CHUNK_TOKENS
        return max(1, round(self.tokens_per_s * CHUNK_INTERVAL_S))

    def plan(
        self, max_tokens: int | None, latency_scale: float, jitter_draw: float = 0.0
    ) -> CompletionPlan:
        """Plan one completion; ``jitter_draw`` in [-1, 1] picks the point in the jitter band."""
        tokens = self.output_tokens
        finish: FinishReason = "stop"
        if max_tokens is not None and max_tokens < tokens:
            tokens, finish = max_tokens, "length"
        factor = latency_scale * (1.0 + self.jitter * max(-1.0, min(1.0, jitter_draw)))
        return CompletionPlan(
            completion_tokens=tokens,
            finish_reason=finish,
            ttft_s=self.ttft_s * factor,
            token_interval_s=factor / self.tokens_per_s,
            tokens_per_chunk=self.tokens_per_chunk,
        )


@dataclass(frozen=True)
class CompletionPlan:
    """Timing and size of one simulated completion, latency_scale and jitter applied."""

    completion_tokens: int
    finish_reason: FinishReason
    ttft_s: float
    token_interval_s: float
    tokens_per_chunk: int

    @property
    def total_s(self) -> float:
        return self.ttft_s + self.completion_tokens * self.token_interval_s

    def shortened(self, tokens: int) -> CompletionPlan:
        """This plan ending after ``tokens`` tokens, by choice ("stop"), if that is sooner."""
        if tokens >= self.completion_tokens:
            return self
        return replace(self, completion_tokens=max(tokens, 1), finish_reason="stop")

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """``[start, end)`` token ranges of the content chunks of a stream."""
        step = self.tokens_per_chunk
        return [
            (start, min(start + step, self.completion_tokens))
            for start in range(0, self.completion_tokens, step)
        ]


# Shaped like the model classes users know: a small fast model, a mid-size one and its newer,
# slightly faster release (a canary candidate), a reasoning model that thinks before it answers,
# a vision model; and one with no latency for benchmarks. Quality: the small model fails most
# maths and logic and much code, the mid-size ones about a third of it (the newer release a
# little less), the reasoning model hardly any; every model handles the other classes, and the
# benchmark model answers everything well.
_MIDDLING = QualityRates(maths=0.6, reasoning=0.6, coding=0.75)
BUILTIN_PROFILES: Mapping[str, LatencyProfile] = MappingProxyType(
    {
        "sim-light": LatencyProfile(
            ttft_s=0.25,
            tokens_per_s=120,
            output_tokens=66,
            quality=QualityRates(maths=0.2, reasoning=0.25, coding=0.4),
        ),
        "sim-balanced": LatencyProfile(
            ttft_s=0.5, tokens_per_s=80, output_tokens=88, quality=_MIDDLING
        ),
        "sim-balanced-next": LatencyProfile(
            ttft_s=0.4,
            tokens_per_s=90,
            output_tokens=88,
            quality=QualityRates(maths=0.65, reasoning=0.65, coding=0.8),
        ),
        "sim-reasoning": LatencyProfile(
            ttft_s=2.5,
            tokens_per_s=60,
            output_tokens=90,
            quality=QualityRates(maths=0.97, reasoning=0.97, coding=0.95),
        ),
        "sim-vision": LatencyProfile(
            ttft_s=0.6, tokens_per_s=100, output_tokens=90, quality=_MIDDLING
        ),
        "sim-instant": LatencyProfile(
            ttft_s=0.0, tokens_per_s=math.inf, output_tokens=16, jitter=0.0
        ),
    }
)


def load_profiles(path: Path | None) -> dict[str, LatencyProfile]:
    """Built-in profiles, updated from a YAML file of ``profiles: {name: {field: value}}``.

    A name that exists is overridden field by field (``sim-light: {error_rate_429: 0.1}``),
    ``quality`` class by class (``sim-light: {quality: {maths: 0.5}}``); a new name needs at
    least ttft_s, tokens_per_s and output_tokens. A bad field is a ValidationError with a note
    naming the file and the profile.
    """
    profiles = dict(BUILTIN_PROFILES)
    if path is None:
        return profiles
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("profiles", {}) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a mapping `profiles: {{name: {{...}}}}`")
    for name, fields in entries.items():
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: profile {name!r} must be a mapping of fields")
        key = str(name)
        try:
            if key in profiles:
                profiles[key] = profiles[key].updated(fields)
            else:
                profiles[key] = LatencyProfile.model_validate(fields)
        except ValidationError as exc:
            exc.add_note(f"in {path}, profile {name!r}")
            raise
    return profiles


def resolve_model(name: str, profiles: Mapping[str, LatencyProfile]) -> str | None:
    """The profile name a request's model maps to (``openai/`` prefix stripped), or None."""
    name = name.removeprefix("openai/")
    return name if name in profiles else None


@dataclass
class QueuedFault:
    model: str  # a profile name or "*"
    kind: FaultKind
    remaining: int

    def matches(self, model: str) -> bool:
        return self.model in ("*", model)


class FaultPlan:
    """Which requests fail: forced (header) > queued (control API, FIFO) > seeded random rates."""

    def __init__(self, seed: int = 0) -> None:
        self._queue: list[QueuedFault] = []
        self._rng = random.Random(seed)

    def enqueue(self, model: str, kind: FaultKind, count: int) -> None:
        self._queue.append(QueuedFault(model, kind, count))

    def clear(self) -> int:
        """Drop every queued fault; returns how many faults were still pending."""
        pending = sum(q.remaining for q in self._queue)
        self._queue.clear()
        return pending

    def pending(self) -> list[dict[str, Any]]:
        return [{"model": q.model, "kind": q.kind.value, "count": q.remaining} for q in self._queue]

    def next_fault(
        self, model: str, profile: LatencyProfile, forced: FaultKind | None = None
    ) -> FaultKind | None:
        """The fault the next request for ``model`` gets, consuming it; None: answer normally."""
        if forced is not None:
            return forced
        for index, queued in enumerate(self._queue):
            if queued.matches(model):
                queued.remaining -= 1
                if queued.remaining <= 0:
                    del self._queue[index]
                return queued.kind
        return self._random_fault(profile)

    def _random_fault(self, profile: LatencyProfile) -> FaultKind | None:
        rates = (
            (FaultKind.RATE_LIMIT, profile.error_rate_429),
            (FaultKind.SERVER_ERROR, profile.error_rate_500),
            (FaultKind.TIMEOUT, profile.timeout_rate),
        )
        if not any(rate for _, rate in rates):
            return None  # no draw: fault-free models do not shift the seeded sequence
        draw = self._rng.random()
        for kind, rate in rates:
            if draw < rate:
                return kind
            draw -= rate
        return None


@dataclass
class ModelStats:
    requests: int = 0
    completed: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in FaultKind})
    # Per class of prompt: answers (choices) served, and how many of them were poor.
    quality: dict[str, dict[str, int]] = field(
        default_factory=lambda: {c.value: {"served": 0, "poor": 0} for c in PromptClass}
    )


class SimulatorStats:
    """Per-model counts of what the simulator served, for tests and the stats endpoint."""

    def __init__(self, models: Sequence[str]) -> None:
        self._models = {name: ModelStats() for name in models}

    def _get(self, model: str) -> ModelStats:
        return self._models.setdefault(model, ModelStats())

    def request(self, model: str) -> None:
        self._get(model).requests += 1

    def completed(self, model: str) -> None:
        self._get(model).completed += 1

    def fault(self, model: str, kind: FaultKind) -> None:
        self._get(model).faults[kind.value] += 1

    def answered(self, model: str, prompt_class: PromptClass, poor: bool) -> None:
        """One answer (one choice) served for a prompt of ``prompt_class``."""
        counts = self._get(model).quality[prompt_class.value]
        counts["served"] += 1
        counts["poor"] += int(poor)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "requests": s.requests,
                "completed": s.completed,
                "faults": dict(s.faults),
                "quality": {c: dict(counts) for c, counts in s.quality.items()},
            }
            for name, s in self._models.items()
        }


def _parts(message: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [part for part in content if isinstance(part, Mapping)]
    return []


def _text(message: Mapping[str, Any]) -> str:
    return "".join(str(p.get("text") or "") for p in _parts(message) if p.get("type") == "text")


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message ("" if none): what a prompt is classified by."""
    user = [_text(m) for m in messages if m.get("role") == "user"]
    return user[-1] if user else ""


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of every message, one per line: what an answer's words and verdict hash."""
    return "\n".join(_text(m) for m in messages)


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """ceil(characters of all message text / 4), plus a fixed 85 tokens per image part."""
    chars = sum(len(_text(m)) for m in messages)
    images = sum(
        1
        for m in messages
        for p in _parts(m)
        if p.get("type") in ("image_url", "input_image", "image")
    )
    return math.ceil(chars / CHARS_PER_TOKEN) + IMAGE_TOKENS * images


_FILLER = (
    "simulated tokens stand in for a real answer so routing latency cost and retries can be "
    "measured without a provider key this text is synthetic and carries no meaning"
).split()


def completion_words(
    model: str, messages: Sequence[Mapping[str, Any]], tokens: int, variant: int = 0
) -> list[str]:
    """Deterministic answer text, one word per token, that quotes the last user message.

    The same prompt always gives the same words, so tests can compare streamed and
    non-streamed answers and spot which request an answer belongs to. ``variant`` (the choice
    index when ``n`` > 1) numbers the answer and changes the words after the quote.
    """
    snippet = " ".join(last_user_text(messages).split())[:SNIPPET_CHARS] or "(no user text)"
    label = f"answer #{variant + 1}" if variant else "answer"
    words = f"Simulated {label} from {model} to: {snippet} ...".split()
    salt = f"\n#{variant}" if variant else ""
    digest = hashlib.sha256((prompt_text(messages) + salt).encode()).digest()
    start = int.from_bytes(digest[:4], "big")
    while len(words) < tokens:
        words.append(_FILLER[(start + len(words)) % len(_FILLER)])
    return words[:tokens]
