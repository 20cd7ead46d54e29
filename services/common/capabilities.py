"""What a configured model can do, and what a request needs of it.

Capabilities: ``tools`` (function calling), ``json_schema`` (answers held to a JSON Schema),
``vision`` (image inputs) and the ``context_window`` (input tokens). Each comes from the model's
``capabilities`` in the routing config where it is set, else from litellm's bundled model map
(``model_prices_and_context_window_backup.json``: its ``supports_function_calling``,
``supports_response_schema``, ``supports_vision`` and ``max_input_tokens``), else it is unknown.
Unknown counts as unable: a request that needs tools goes only to a model known to take them, and
the error for a tier with none says which setting to add.

The map is read as data, so the router learns what litellm knows without importing litellm.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.v1 import ChatRequest
from services.common import tokens
from services.common.routing_config import LoadedConfig, ModelSpec, TierSpec

_MAP_FILE = "model_prices_and_context_window_backup.json"
_FLAGS = {
    "tools": "supports_function_calling",
    "json_schema": "supports_response_schema",
    "vision": "supports_vision",
}
# what asks for each capability, named in errors
ASKED_BY = {"tools": "tools", "json_schema": "response_format", "vision": "messages"}


@dataclass(frozen=True)
class Capabilities:
    tools: bool
    json_schema: bool
    vision: bool
    context_window: int | None  # input tokens; None: not known, not checked

    def lacks(self, needs: Needs) -> list[str]:
        """The capabilities of ``needs`` this model does not have, in a fixed order."""
        missing = [name for name in needs.capabilities if not getattr(self, name)]
        if not self.fits(needs):
            missing.append("context_window")
        return missing

    def fits(self, needs: Needs) -> bool:
        """Does the prompt fit the context window (an unknown window takes anything)?"""
        window = self.context_window
        # A token is a byte at least, and a character 4 bytes at most: a prompt that fits by
        # those bounds is not counted (the count is a tokenizer pass).
        if window is None or 4 * needs.chars <= window:
            return True
        return needs.most_tokens <= window or needs.prompt_tokens <= window


@dataclass(frozen=True)
class Needs:
    capabilities: tuple[str, ...]
    texts: tuple[str, ...]  # each message's text
    chars: int  # of the texts joined by newlines

    @functools.cached_property
    def text(self) -> str:
        return "\n".join(self.texts)

    @functools.cached_property
    def prompt_tokens(self) -> int:
        """The prompt's tokens, by services/common/tokens.py."""
        return tokens.count(self.text)

    @functools.cached_property
    def most_tokens(self) -> int:
        return len(self.text.encode())


def needs(request: ChatRequest) -> Needs:
    wanted = []
    if request.has_tools:
        wanted.append("tools")
    if request.response_format is not None and request.response_format.type == "json_schema":
        wanted.append("json_schema")
    if any(m.image_count() for m in request.messages):
        wanted.append("vision")
    texts = tuple(m.text() for m in request.messages)
    return Needs(tuple(wanted), texts, sum(map(len, texts)) + max(len(texts) - 1, 0))


@functools.lru_cache(maxsize=1)
def _litellm_map() -> dict[str, Any]:
    found = importlib.util.find_spec("litellm")
    if found is None or not found.submodule_search_locations:
        return {}
    path = Path(next(iter(found.submodule_search_locations))) / _MAP_FILE
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def litellm_entry(model: str) -> dict[str, Any] | None:
    """litellm's map entry for a litellm model string (``openai/gpt-4o-mini`` or ``gpt-4o``)."""
    table = _litellm_map()
    for key in (model, model.split("/", 1)[-1]):
        entry = table.get(key)
        if isinstance(entry, dict):
            return entry
    return None


@functools.lru_cache(maxsize=1024)
def of(spec: ModelSpec) -> Capabilities:
    declared = spec.capabilities
    entry = litellm_entry(spec.model) or {}
    values: dict[str, Any] = {}
    for name, flag in _FLAGS.items():
        own = getattr(declared, name) if declared is not None else None
        values[name] = bool(own if own is not None else entry.get(flag, False))
    window = declared.context_window if declared is not None else None
    if window is None and isinstance(entry.get("max_input_tokens"), int):
        window = entry["max_input_tokens"]
    return Capabilities(**values, context_window=window)


class MissingCapability(ValueError):
    """No model of the chosen tier can do what the request asks."""

    def __init__(
        self,
        tier: str,
        missing: str,
        models: list[str],
        prompt_tokens: int | None = None,
        window: tuple[str, int] | None = None,  # the largest window anywhere: (model, tokens)
    ) -> None:
        self.tier, self.capability, self.param = tier, missing, ASKED_BY.get(missing, "messages")
        self.models, self.prompt_tokens = models, prompt_tokens
        if missing == "context_window":
            what = f"takes a prompt this long (about {prompt_tokens} tokens)"
            hint = "shorten it, or add a model with a larger context_window to the tier"
            if window is not None:
                what = f"has a context window for this prompt (about {prompt_tokens:,} tokens)"
                hint = (
                    f"the largest context window is {window[1]:,} tokens ({window[0]}): "
                    "shorten the prompt, or add a model with a larger context_window"
                )
        else:
            what = f"is known to support {missing}"
            hint = (
                f"send it to a tier that has one, or set `capabilities: {{{missing}: true}}` on "
                "a model of this tier that does (litellm's model map does not say so)"
            )
        super().__init__(f"no model of tier {tier!r} ({', '.join(models)}) {what}: {hint}")


class TierCapabilities:
    """The capabilities of one tier's models, worked out once (routing asks per request)."""

    def __init__(self, name: str, tier: TierSpec) -> None:
        self.name = name
        self.labels = [spec.label for spec in tier.models]
        self.models = [of(spec) for spec in tier.models]
        self._windows = any(c.context_window is not None for c in self.models)

    def check(self, request: ChatRequest, pinned: str | None = None) -> None:
        """Raise ``MissingCapability`` when no model of the tier (or the ``pinned`` one) can
        take ``request``."""
        wanted = needs(request)
        if not wanted.capabilities and not self._windows:
            return
        chosen = [
            (label, c)
            for label, c in zip(self.labels, self.models, strict=True)
            if pinned is None or label == pinned
        ]
        gaps = [c.lacks(wanted) for _, c in chosen]
        if gaps and all(gaps):
            # name what the closest model lacks: the fewest gaps, first in the tier's order
            closest = min(gaps, key=len)
            windows = [(label, c.context_window) for label, c in chosen if c.context_window]
            raise MissingCapability(
                self.name,
                closest[0],
                [label for label, _ in chosen],
                wanted.prompt_tokens if closest[0] == "context_window" else None,
                max(windows, key=lambda w: w[1]) if windows else None,
            )


def _windows(config: LoadedConfig) -> list[tuple[str, int]]:
    """Every model of the config whose context window is known: (label, tokens)."""
    return [
        (spec.label, window)
        for tier in config.spec.tiers.values()
        for spec in tier.models
        if (window := of(spec).context_window) is not None
    ]


def largest_window(config: LoadedConfig) -> tuple[str, int] | None:
    """The model with the largest known context window of any tier: (label, tokens)."""
    known = _windows(config)
    return max(known, key=lambda k: k[1]) if known else None


def smallest_window(config: LoadedConfig) -> int | None:
    """The smallest known context window of the config's models (``fits_context``'s bound)."""
    known = _windows(config)
    return min(w for _, w in known) if known else None
