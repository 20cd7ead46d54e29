"""The semantic stage as the router runs it: the encoder, and each config's route set.

A config's route set (its routes' utterances encoded, or its trained classifier) is built once
per config hash, before the config is applied, so no request waits for it. Scoring a request
goes through the encoder's micro-batcher (services/router/adapters/embedder.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np

from services.common.routing_config import LoadedConfig, SemanticSpec
from services.router.adapters.embedder import Encoder, MicroBatcher
from services.router.domain.classify import Pending
from services.router.domain.semantic import (
    Match,
    RouteClassifier,
    RouteIndex,
    Routes,
    signal_vector,
)

log = logging.getLogger(__name__)
# Route sets kept: the config in force and the one before it, for requests decided across a swap.
_KEPT = 2


@functools.lru_cache(maxsize=2)
def shared_encoder(max_tokens: int, threads: int, precision: str) -> Encoder:
    """One encoder per process and setting: a config swap that keeps them reuses it (building
    one takes seconds and a hundred megabytes)."""
    return Encoder(max_tokens, threads, precision=precision)


class SemanticStage:
    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher = batcher
        self._sets: dict[str, Routes] = {}
        self.failures = 0  # requests the stage could not score (logged); they went on without it

    @classmethod
    def for_config(
        cls, config: LoadedConfig, threads: int = 1, max_batch: int = 16
    ) -> SemanticStage | None:
        """The stage for ``config``, its route set built; None when the config has none.
        Raises ``EncoderUnavailable`` when the `semantic` extra is not installed."""
        spec = config.spec.semantic
        if spec is None:
            return None
        encoder = shared_encoder(spec.max_tokens, threads, spec.precision)
        stage = cls(MicroBatcher(encoder.encode, max_batch))
        stage.prepare(config)
        return stage

    def prepare(self, config: LoadedConfig) -> None:
        """Build ``config``'s route set (blocking: run it off the event loop when serving)."""
        spec = config.spec.semantic
        if spec is None or config.hash in self._sets:
            return
        routes = self._build(config, spec)
        self._sets[config.hash] = routes
        while len(self._sets) > _KEPT:
            self._sets.pop(next(iter(self._sets)))

    def _build(self, config: LoadedConfig, spec: SemanticSpec) -> Routes:
        if config.classifier is not None:
            c = config.classifier
            named = [(route, tier, spec.threshold) for route, tier in c.routes]
            return RouteClassifier(named, c.weights, c.bias, c.signals)
        named, texts, owners = [], [], []
        for i, (name, route) in enumerate(spec.routes.items()):
            named.append((name, route.tier, route.threshold or spec.threshold))
            texts += route.utterances
            owners += [i] * len(route.utterances)
        vectors = np.concatenate(
            [self.batcher.encode_now(texts[i : i + 64]) for i in range(0, len(texts), 64)]
        )
        return RouteIndex(named, vectors, owners, spec.top_k)

    def _routes(self, config: LoadedConfig) -> Routes:
        routes = self._sets.get(config.hash)
        if routes is None:  # a config applied without prepare: build now, once
            self.prepare(config)
            routes = self._sets[config.hash]
        return routes

    async def match(self, pending: Pending, config: LoadedConfig) -> Match | None:
        """The best route for ``pending``; None (logged, counted) if the encoder failed."""
        try:
            routes = self._routes(config)
            vector = await self.batcher.encode(pending.text)
            return routes.best(vector[None, :], _signals(routes, pending))[0]
        except Exception:
            self.failures += 1
            log.exception("the semantic stage failed; the request goes on without it")
            return None

    def match_now(self, pending: Pending, config: LoadedConfig) -> Match:
        """``match`` on the caller's thread (``switchboard eval``)."""
        routes = self._routes(config)
        vector = self.batcher.encode_now([pending.text])
        return routes.best(vector, _signals(routes, pending))[0]

    def matcher(self, config: LoadedConfig) -> Callable[[Pending], Match]:
        """``match_now`` for ``config``: what ``classify`` takes as its semantic stage."""
        return functools.partial(self.match_now, config=config)

    def close(self) -> None:
        self.batcher.close()


def _signals(routes: Routes, pending: Pending) -> np.ndarray | None:
    names = getattr(routes, "signals", ())
    return signal_vector(pending.features.get, names)[None, :] if names else None
