"""The semantic stage's decision: which route a request's vector is closest to, and how sure.

Two kinds of route sets, both built from the config's ``semantic`` section:

- **Example utterances** (``RouteIndex``): each route lists requests that belong to it. A text's
  score for a route is the mean cosine similarity of its ``top_k`` nearest utterances there
  (semantic-router aggregates the top-k nearest in a similar way), so one stray utterance
  cannot carry a route on its own.
- **A trained classifier** (``RouteClassifier``): the file ``switchboard train`` writes, a
  softmax over routes fitted on labelled prompts; the score is the chosen route's probability.

Either way the best route decides only at or above its threshold; below it the request goes on
to the rules marked ``after_semantic``, then the default tier. Vectors come from an encoder
(services/router/adapters/embedder.py); nothing here loads a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from schemas.v1 import ChatRequest

# A long message is read at both ends: what is asked sits at the start or after a pasted text.
EDGE_CHARS = 600
RULE_PREFIX = "semantic:"


@dataclass(frozen=True)
class Match:
    """The best route for one text: its name, its tier, and its score in [0, 1]."""

    route: str
    tier: str
    score: float
    threshold: float

    @property
    def decides(self) -> bool:
        return self.score >= self.threshold

    @property
    def rule(self) -> str:
        return RULE_PREFIX + self.route


class Routes(Protocol):
    """A route set: the best route for each row of unit vectors (and, for a classifier that
    reads them, each row of ``signal_vector``s)."""

    def best(self, vectors: np.ndarray, signals: np.ndarray | None = None) -> list[Match]: ...


# The cheap signals (services/router/domain/signals.py) a trained classifier may read beside
# the text's vector, each scaled to about [0, 1] so none outweighs the 384 vector components.
SIGNALS: dict[str, Callable[[Any], float]] = {
    "has_code": float,
    "has_math": float,
    "reasoning_markers": lambda n: min(n, 3) / 3,
    "multi_step": float,
    "complexity": lambda n: n / 10,
    "prompt_chars": lambda n: min(math.log1p(n) / 10, 1.0),
}
SIGNAL_WEIGHT = 0.5  # how loud the signals are beside the vector when fitting


def signal_vector(get: Callable[[str], Any], names: Sequence[str]) -> np.ndarray:
    """The signals ``names`` of one request, read through ``get`` (a ``Features.get``)."""
    return np.array([SIGNALS[n](get(n)) * SIGNAL_WEIGHT for n in names], np.float32)


def text_of(request: ChatRequest) -> str:
    """What the semantic stage reads: the last user message, or its two ends when long."""
    text = request.last_user_text()
    if len(text) <= 2 * EDGE_CHARS:
        return text
    return f"{text[:EDGE_CHARS]}\n...\n{text[-EDGE_CHARS:]}"


class RouteIndex:
    """Example utterances' vectors, grouped by route."""

    def __init__(
        self,
        routes: list[tuple[str, str, float]],  # (name, tier, threshold) in config order
        vectors: np.ndarray,  # one unit row per utterance
        owners: list[int],  # the index into ``routes`` of each row
        top_k: int,
    ) -> None:
        if len(owners) != len(vectors):
            raise ValueError("one owner per utterance vector")
        self.routes = routes
        self._vectors = np.ascontiguousarray(vectors, np.float32)
        self._top_k = top_k
        owned = np.asarray(owners)
        self._rows = [np.flatnonzero(owned == i) for i in range(len(routes))]

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """(texts by routes): each route's mean similarity of its ``top_k`` nearest utterances."""
        similarity = vectors @ self._vectors.T
        out = np.empty((len(vectors), len(self.routes)), np.float32)
        for i, rows in enumerate(self._rows):
            own = similarity[:, rows]
            k = min(self._top_k, own.shape[1])
            nearest = np.partition(own, own.shape[1] - k, axis=1)[:, -k:]
            out[:, i] = nearest.mean(axis=1)
        return out

    def best(self, vectors: np.ndarray, signals: np.ndarray | None = None) -> list[Match]:
        scores = self.scores(vectors)
        return [_match(self.routes, row) for row in scores]


class RouteClassifier:
    """A softmax over routes from ``switchboard train``: per route a row of weights over the
    text's vector and then the ``signals`` it names, and a bias."""

    def __init__(
        self,
        routes: list[tuple[str, str, float]],
        weights: np.ndarray,
        bias: np.ndarray,
        signals: Sequence[str] = (),
    ) -> None:
        if weights.shape[0] != len(routes) or bias.shape != (len(routes),):
            raise ValueError("one row of weights and one bias per route")
        self.routes = routes
        self.signals = tuple(signals)
        self._weights = np.ascontiguousarray(weights, np.float32)
        self._bias = np.asarray(bias, np.float32)

    def probabilities(self, vectors: np.ndarray, signals: np.ndarray | None = None) -> np.ndarray:
        if self.signals:
            if signals is None:
                raise ValueError(f"this classifier reads the signals {', '.join(self.signals)}")
            vectors = np.concatenate([vectors, signals], axis=1)
        logits = vectors @ self._weights.T + self._bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def best(self, vectors: np.ndarray, signals: np.ndarray | None = None) -> list[Match]:
        return [_match(self.routes, row) for row in self.probabilities(vectors, signals)]


def _match(routes: list[tuple[str, str, float]], scores: np.ndarray) -> Match:
    i = int(np.argmax(scores))
    name, tier, threshold = routes[i]
    return Match(name, tier, round(float(scores[i]), 4), threshold)
