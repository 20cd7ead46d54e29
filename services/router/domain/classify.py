"""Which tier a request goes to: a forced tier, the first matching rule, or the default."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from schemas.v1 import AUTO_MODEL, ChatRequest
from services.common.routing_config import LoadedConfig

CHARS_PER_TOKEN = 4


class UnknownModel(ValueError):
    """The request's ``model`` is neither ``switchboard/auto`` nor a tier name."""

    def __init__(self, model: str, tiers: list[str]) -> None:
        self.model = model
        choices = ", ".join([AUTO_MODEL, *tiers])
        super().__init__(f"unknown model {model!r}; use one of: {choices}")


@dataclass(frozen=True)
class Decision:
    tier: str
    rule: str


def features(request: ChatRequest) -> dict[str, Any]:
    """The values rule conditions can read (see services.common.conditions.FIELDS)."""
    texts = [m.text() for m in request.messages]
    prompt = "\n".join(texts)
    images = sum(m.image_count() for m in request.messages)
    meta = request.metadata
    out: dict[str, Any] = {
        "prompt": prompt,
        "last_user": request.last_user_text(),
        "system": "\n".join(
            t
            for m, t in zip(request.messages, texts, strict=True)
            if m.role in ("system", "developer")
        ),
        "prompt_chars": len(prompt),
        "prompt_tokens": math.ceil(len(prompt) / CHARS_PER_TOKEN),
        "message_count": len(request.messages),
        "image_count": images,
        "has_images": images > 0,
        "requires_reasoning": meta.requires_reasoning,
        "priority": meta.priority,
        "task": meta.task,
        "tenant": meta.tenant,
        "model": request.model,
        "max_tokens": request.max_tokens,
    }
    for key, value in meta.tags.items():
        out[f"tags.{key}"] = value
    return out


def classify(request: ChatRequest, config: LoadedConfig) -> Decision:
    if request.model != AUTO_MODEL:
        if request.model in config.spec.tiers:
            return Decision(request.model, "forced")
        raise UnknownModel(request.model, config.tier_names)
    feats = features(request)
    for rule, condition in config.rules:
        if condition.matches(feats):
            return Decision(rule.tier, rule.name)
    return Decision(config.spec.default, "default")
