"""The tier's attempt plan: which model to try, how long to give it, when to stop."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from schemas.v1 import AttemptStatus
from services.common.routing_config import ModelSpec, TierSpec
from services.common.sql import tenant_hash as tenant_hash  # the rows' form, shared
from services.workers.errors import ModelCallError

_STATUS: dict[str, AttemptStatus] = {"timeout": "timeout", "rate_limited": "rate_limited"}


@dataclass(frozen=True)
class Attempt:
    index: int  # 0-based across the whole request
    spec: ModelSpec
    retry: int  # 0 = first try of this model


def pinned_models(tier: TierSpec, pinned: str | None) -> list[ModelSpec]:
    """The models that may answer: all of the tier's; for a request that pinned a model, that
    one, then (if it allows ``pinned_fallback``) the others. Empty: the tier has no such model."""
    if pinned is None:
        return list(tier.models)
    chosen = [m for m in tier.models if m.label == pinned]
    if chosen and chosen[0].pinned_fallback:
        chosen += [m for m in tier.models if m.label != pinned]
    return chosen


def attempts(tier: TierSpec, models: list[ModelSpec] | None = None) -> Iterator[Attempt]:
    """Models in order (``models``, default the tier's), each tried 1 + ``retries_per_model``
    times (the caller stops early)."""
    index = 0
    for spec in tier.models if models is None else models:
        for retry in range(tier.retries_per_model + 1):
            yield Attempt(index, spec, retry)
            index += 1


def attempt_timeout(tier: TierSpec, spec: ModelSpec, remaining_s: float | None) -> float:
    budget = spec.timeout_s or tier.timeout_s
    return budget if remaining_s is None else min(budget, remaining_s)


def remaining_s(deadline_at: datetime | None, now: datetime) -> float | None:
    return None if deadline_at is None else (deadline_at - now).total_seconds()


def backoff_s(tier: TierSpec, retry: int) -> float:
    return tier.retry_backoff_s * (2 ** max(retry - 1, 0))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def status_of(error: ModelCallError) -> AttemptStatus:
    """The row status of a failed call: timeout, rate_limited, or error."""
    return _STATUS.get(error.code, "error")
