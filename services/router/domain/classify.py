"""Which tier a request goes to: a forced tier, a pinned model's tier, the first matching rule,
or the default."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.v1 import AUTO_MODEL, ChatRequest
from services.common import tokens
from services.common.capabilities import smallest_window
from services.common.conditions import TAG_PREFIX
from services.common.routing_config import LoadedConfig
from services.router.domain import signals
from services.router.domain.semantic import Match, text_of


class UnknownModel(ValueError):
    """The request's ``model`` is not ``switchboard/auto``, a tier, or a configured model."""

    def __init__(self, model: str, tiers: list[str], models: Sequence[str] = ()) -> None:
        self.model = model
        choices = ", ".join([AUTO_MODEL, *tiers])
        named = f"; or pin a model: {', '.join(models)}" if models else ""
        super().__init__(
            f"unknown model {model!r}; use one of: {choices}{named} (GET /v1/models lists them)"
        )


@dataclass(frozen=True)
class Decision:
    tier: str
    rule: str
    pinned: str | None = None  # the model's label, when the request named one
    score: float | None = None  # the semantic stage's best score, when it ran


def _prompt(f: Features) -> str:
    return "\n".join(f.texts)


def _system(f: Features) -> str:
    messages = f.request.messages
    return "\n".join(
        t for m, t in zip(messages, f.texts, strict=True) if m.role in ("system", "developer")
    )


def _image_count(f: Features) -> int:
    return sum(m.image_count() for m in f.request.messages if type(m.content) is list)


def _prompt_chars(f: Features) -> int:
    texts = f.texts
    return sum(map(len, texts)) + max(len(texts) - 1, 0)  # == len(prompt), without joining


def _scanned(f: Features) -> str:
    """The part of the last user message the signals read."""
    return signals.scanned(f.get("last_user"))


# How each field of services.common.conditions.FIELDS is computed from a request.
_COMPUTE: dict[str, Callable[[Features], Any]] = {
    "prompt": _prompt,
    "last_user": lambda f: f.request.last_user_text(),
    "system": _system,
    "prompt_chars": _prompt_chars,
    "prompt_tokens": lambda f: tokens.count(f.get("prompt")),
    "fits_context": lambda f: f.window is None or f.get("prompt_tokens") <= f.window,
    "message_count": lambda f: len(f.request.messages),
    "image_count": _image_count,
    "has_images": lambda f: f.get("image_count") > 0,
    "has_tools": lambda f: f.request.has_tools,
    "wants_json": lambda f: f.request.wants_json,
    "requires_reasoning": lambda f: f.request.metadata.requires_reasoning,
    "priority": lambda f: f.request.metadata.priority,
    "task": lambda f: f.request.metadata.task,
    "tenant": lambda f: f.request.metadata.tenant,
    "model": lambda f: f.request.model,
    "max_tokens": lambda f: f.request.token_cap,
    "has_code": lambda f: signals.has_code(_scanned(f)),
    "has_math": lambda f: signals.has_math(_scanned(f)),
    "reasoning_markers": lambda f: signals.reasoning_markers(_scanned(f)),
    "multi_step": lambda f: signals.multi_step(_scanned(f)),
    "complexity": lambda f: signals.complexity(
        f.get("has_code"),
        f.get("has_math"),
        f.get("multi_step"),
        f.get("reasoning_markers"),
        len(f.get("last_user").split()),
        f.get("user_turns"),
    ),
    "user_turns": lambda f: sum(m.role == "user" for m in f.request.messages),
}


class Features(Mapping[str, Any]):
    """The values rule conditions read (services.common.conditions.FIELDS, ``tags.<key>``).

    Computed on first read and kept: a rule set reads a handful of fields and stops at the first
    matching rule, so building every field up front (joining all texts three ways) was most of
    the cost of a decision.
    """

    __slots__ = ("_cache", "_texts", "request", "window")
    request: ChatRequest
    window: int | None

    def __init__(self, request: ChatRequest, window: int | None = None) -> None:
        self.request = request
        self.window = window  # fits_context's bound: the config's smallest context window
        self._cache: dict[str, Any] = {}
        self._texts: list[str] | None = None

    @property
    def texts(self) -> list[str]:
        """Each message's text, in order."""
        if self._texts is None:
            self._texts = [m.text() for m in self.request.messages]
        return self._texts

    def upper_bound(self, name: str) -> int | None:
        """A cheap upper bound of a field the conditions may compare without computing it
        (conditions.BOUNDED): a prompt has no more tokens than UTF-8 bytes."""
        if name != "prompt_tokens" or name in self._cache:
            return None
        bound = self._cache.get("_prompt_bytes")
        if bound is None:
            bound = self._cache["_prompt_bytes"] = len(self.get("prompt").encode())
        return int(bound)

    def get(self, name: str, default: Any = None) -> Any:
        cache = self._cache
        if name in cache:
            return cache[name]
        compute = _COMPUTE.get(name)
        if compute is not None:
            value = compute(self)
        elif name.startswith(TAG_PREFIX):
            value = self.request.metadata.tags.get(name[len(TAG_PREFIX) :])
        else:
            return default
        cache[name] = value
        return value

    def __getitem__(self, name: str) -> Any:
        if name in _COMPUTE or (
            name.startswith(TAG_PREFIX) and name[len(TAG_PREFIX) :] in self.request.metadata.tags
        ):
            return self.get(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        yield from _COMPUTE
        for key in self.request.metadata.tags:
            yield f"{TAG_PREFIX}{key}"

    def __len__(self) -> int:
        return len(_COMPUTE) + len(self.request.metadata.tags)


def features(request: ChatRequest) -> dict[str, Any]:
    """Every feature of ``request`` at once (for inspection and tests; ``classify`` is lazy)."""
    return dict(Features(request))


PINNED = "pinned"  # the rule of a request that named a model


@functools.lru_cache(maxsize=8)
def _window(config: LoadedConfig) -> int | None:
    """The config's smallest context window, worked out once per config."""
    return smallest_window(config)


@dataclass(frozen=True)
class Pending:
    """No rule before the semantic stage matched: the stage reads ``text`` and ``settle``
    finishes the decision with its match."""

    features: Features
    text: str


def first_stage(request: ChatRequest, config: LoadedConfig) -> Decision | Pending:
    """A tier name forces the tier; a model name (label, litellm string or alias) pins the model
    through its tier; ``switchboard/auto`` goes by the rules. With a semantic stage configured,
    a request no rule before it matched is ``Pending``; without one, it gets the default."""
    if request.model != AUTO_MODEL:
        if request.model in config.spec.tiers:
            return Decision(request.model, "forced")
        pin = config.pins.get(request.model)
        if pin is not None:
            return Decision(pin.tier, PINNED, pin.label)
        labels = list(dict.fromkeys(p.label for p in config.pins.values()))
        raise UnknownModel(request.model, config.tier_names, labels)
    feats = Features(request, _window(config))
    for rule, condition in config.rules_before:
        if condition.matches(feats):
            return Decision(rule.tier, rule.name)
    if config.spec.semantic is None:
        return Decision(config.spec.default, "default")
    return Pending(feats, text_of(request))


def settle(pending: Pending, config: LoadedConfig, match: Match | None) -> Decision:
    """The semantic stage's route when it reaches its threshold; else the first matching rule
    marked ``after_semantic``; else the default. The score is kept either way."""
    score = None if match is None else match.score
    if match is not None and match.decides:
        return Decision(match.tier, match.rule, score=score)
    for rule, condition in config.rules_after:
        if condition.matches(pending.features):
            return Decision(rule.tier, rule.name, score=score)
    return Decision(config.spec.default, "default", score=score)


def classify(
    request: ChatRequest,
    config: LoadedConfig,
    semantic: Callable[[Pending], Match] | None = None,
) -> Decision:
    """The whole decision in one call: ``semantic`` scores a pending request (``switchboard
    eval``, tests); without it the semantic stage is passed over, as when it matched nothing."""
    stage = first_stage(request, config)
    if isinstance(stage, Decision):
        return stage
    return settle(stage, config, None if semantic is None else semantic(stage))
