"""Experiments: who goes to the candidate, and the figures a canary is judged by.

Assignment is a pure function of the experiment's name, the request's sticky key and the share
in force::

    bucket = blake2b(name, key) mod 10 000        (the same key: the same bucket, always)
    candidate  ⇔  bucket < share_pct * 100

A key keeps its variant while the share holds, and raising the share only adds buckets below the
new line: keys move from baseline to candidate, never back and forth (lowering it, as a rollback
does, moves them back). The name salts the hash, so two experiments split the keys
independently.

``FIGURES`` names what the criteria of an experiment may read (services/common/conditions.py),
for the candidate, and under ``baseline.`` for the tier's own models over the same window.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Literal

from schemas.v1 import ChatRequest, ExperimentTag, Variant

Sticky = Literal["tenant", "user", "conversation", "request"]
BUCKETS = 10_000  # share resolution: 0.01 %
# tags a conversation id may come under, in the order they are looked for
CONVERSATION_TAGS = ("conversation_id", "conversation", "session_id", "episode_id")

_CANDIDATE_FIGURES: dict[str, type] = {
    "requests": int,  # requests assigned to the variant in the window
    "attempts": int,  # model calls of the variant's model(s)
    "errors": int,  # calls that did not answer (error, timeout, rate_limited, cut_off)
    "error_rate": float,  # errors / attempts
    "p50_latency_ms": float,
    "p95_latency_ms": float,
    "p99_latency_ms": float,
    "p95_ttft_ms": float,  # streamed answers only
    "tokens": int,  # prompt + completion tokens of answered calls
    "cost_per_1k": float,  # USD per 1,000 tokens
    "feedback": int,  # scores given (llm_feedback) for the variant's requests
    "accuracy": float,  # their mean, 0..1
}
FIGURES: dict[str, type] = {
    **_CANDIDATE_FIGURES,
    **{f"baseline.{name}": typ for name, typ in _CANDIDATE_FIGURES.items()},
    "accuracy_delta": float,  # the candidate's accuracy minus the baseline's
}
BOUNDED = ("error_rate", "p50_latency_ms", "p95_latency_ms", "p99_latency_ms", "p95_ttft_ms")


def sticky_key(request: ChatRequest, sticky: Sticky) -> str:
    """What keeps a caller on one variant: the tenant, the end user (OpenAI ``user``, else tag
    ``user``), the conversation (a tag of ``CONVERSATION_TAGS``) or the request. A request
    without the key it asks for is assigned by its id."""
    meta = request.metadata
    key: str | None = None
    if sticky == "tenant":
        key = meta.tenant
    elif sticky == "user":
        key = request.user or meta.tags.get("user")
    elif sticky == "conversation":
        key = next((meta.tags[t] for t in CONVERSATION_TAGS if meta.tags.get(t)), None)
    return f"{sticky}:{key}" if key else f"request:{request.request_id}"


def bucket(experiment: str, key: str) -> int:
    digest = blake2b(f"{experiment}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def variant(experiment: str, key: str, share_pct: float) -> Variant:
    return "candidate" if bucket(experiment, key) < round(share_pct * BUCKETS / 100) else "baseline"


def tag(experiment: str, request: ChatRequest, sticky: Sticky, share_pct: float) -> ExperimentTag:
    chosen = variant(experiment, sticky_key(request, sticky), share_pct)
    return ExperimentTag(name=experiment, variant=chosen, share_pct=share_pct)
