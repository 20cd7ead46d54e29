"""``switchboard train DATA.jsonl``: fit the semantic stage's route classifier on labelled prompts.

DATA.jsonl is what ``switchboard eval`` reads (expected_tier, and prompt or messages; class
optional). Each prompt is encoded as the router encodes it (services/router/stage.py), and a
softmax regression over routes is fitted to the vectors, with the cheap signals
(services/router/domain/semantic.py SIGNALS) beside them: one route per class whose prompts all go
to one tier (``maths`` → reasoning), ``class-tier`` for a class split over tiers, the tier itself
for prompts with no class. Prompts with images are left out: the rules send those to a vision
tier, and the stage only ever reads text.

Before the final fit on everything, a k-fold cross-validation says how often the classifier picks
the right TIER for prompts it was not fitted on; that figure is printed and kept in the file. The
output is JSON (services/common/route_classifier.py) that a routing config names::

    semantic:
      classifier: routes.json     # relative to the config file
      threshold: 0.4
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from services.common.route_classifier import DIMENSIONS, KNOWN_SIGNALS, ClassifierFile
from services.router.adapters.embedder import MODEL_NAME, Encoder
from services.router.domain.classify import Features
from services.router.domain.semantic import RouteClassifier, signal_vector, text_of
from switchboard.evaluate import DataError, Item, load_items

EPOCHS = 400
LEARNING_RATE = 0.05
L2 = 1e-2  # keeps weights small: vectors of unseen phrasings land nearer the middle
SCALE = 10.0  # unit vectors give small logits; scaled, the softmax can grow sure


@dataclass(frozen=True)
class Fitted:
    routes: list[tuple[str, str]]  # (route, tier)
    weights: np.ndarray
    bias: np.ndarray


def route_names(items: list[Item]) -> list[tuple[str, str]]:
    """Each item's (route, tier): its class when the class keeps to one tier, else class-tier."""
    tiers_of: dict[str, set[str]] = {}
    for item in items:
        tiers_of.setdefault(item.klass, set()).add(item.expected)
    out = []
    for item in items:
        if item.klass == "-":
            route = item.expected
        elif len(tiers_of[item.klass]) == 1:
            route = item.klass
        else:
            route = f"{item.klass}-{item.expected}"
        out.append((_slug(route), item.expected))
    return out


def _slug(name: str) -> str:
    slug = "".join(c if c.isalnum() or c in "_-" else "_" for c in name.lower()).strip("_-")
    return slug if slug[:1].isalpha() else f"r{slug}"


def fit(
    vectors: np.ndarray, labels: list[int], classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression by full-batch Adam on cross-entropy plus an L2 penalty; the weights
    come out multiplied by SCALE, so ``RouteClassifier`` needs no scale of its own."""
    rng = np.random.default_rng(seed)
    x = vectors.astype(np.float64) * SCALE
    y = np.zeros((len(labels), classes))
    y[np.arange(len(labels)), labels] = 1
    w = rng.normal(0, 0.01, (classes, x.shape[1]))
    b = np.zeros(classes)
    moments = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    for step in range(1, EPOCHS + 1):
        logits = x @ w.T + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        error = (p - y) / len(labels)
        grads = (error.T @ x + L2 * w, error.sum(axis=0))
        for i, (param, grad) in enumerate(zip((w, b), grads, strict=True)):
            m, v = moments[2 * i], moments[2 * i + 1]
            m[:] = 0.9 * m + 0.1 * grad
            v[:] = 0.999 * v + 0.001 * grad**2
            param -= LEARNING_RATE * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return (w * SCALE).astype(np.float32), b.astype(np.float32)


def cross_validate(
    inputs: np.ndarray, labels: list[int], routes: list[tuple[str, str]], folds: int
) -> float:
    """Share of items whose predicted route's tier is their tier, each predicted by a model
    fitted without its fold (items dealt to folds in turn, after a seeded shuffle). ``inputs``
    are the vectors with the signals after them."""
    vectors, signals = inputs[:, :DIMENSIONS], inputs[:, DIMENSIONS:]
    order = np.random.default_rng(0).permutation(len(labels))
    right = 0
    for k in range(folds):
        held = order[k::folds]
        kept = np.setdiff1d(order, held)
        w, b = fit(inputs[kept], [labels[i] for i in kept], len(routes))
        named = [(r, t, 0.0) for r, t in routes]
        classifier = RouteClassifier(named, w, b, KNOWN_SIGNALS)
        for i, match in zip(held, classifier.best(vectors[held], signals[held]), strict=True):
            right += match.tier == routes[labels[i]][1]
    return right / len(labels)


def train(
    data: Path, tiers: list[str], folds: int = 5, max_tokens: int = 128, precision: str = "int8"
) -> tuple[ClassifierFile, dict[str, int]]:
    items = [
        i
        for i in load_items(data, tiers)
        if not any(m.image_count() for m in i.request.messages if type(m.content) is list)
    ]
    if len(items) < 2 * folds:
        raise DataError(f"{data}: {len(items)} text prompts; train needs at least {2 * folds}")
    named = route_names(items)
    routes = list(dict.fromkeys(named))
    index = {route: i for i, route in enumerate(routes)}
    labels = [index[n] for n in named]
    encoder = Encoder(max_tokens, precision=precision)
    texts = [text_of(item.request) for item in items]
    vectors = np.concatenate([encoder.encode(texts[i : i + 32]) for i in range(0, len(texts), 32)])
    signals = np.stack([signal_vector(Features(item.request).get, KNOWN_SIGNALS) for item in items])
    inputs = np.concatenate([vectors, signals], axis=1)
    accuracy = cross_validate(inputs, labels, routes, folds) if folds > 1 else None
    w, b = fit(inputs, labels, len(routes))
    trained = {
        "data": data.name,
        "items": len(items),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "folds": folds,
        "cv_tier_accuracy": None if accuracy is None else round(accuracy, 4),
        "max_tokens": max_tokens,
    }
    counts = Counter(route for route, _ in named)
    classifier = ClassifierFile(MODEL_NAME, routes, w, b, trained, KNOWN_SIGNALS, precision)
    return classifier, dict(counts)


def train_command(data: str, output: str, config_path: str | None, folds: int) -> int:
    from services.common.routing_config import ConfigError, load_config
    from services.common.settings import CommonSettings
    from services.router.adapters.embedder import EncoderUnavailable

    if not 0 <= folds <= 20 or folds == 1:
        print("train: --folds is 0 (no cross-validation) or 2 to 20", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path or CommonSettings().config)
        spec = config.spec.semantic
        encoding = (spec.max_tokens, spec.precision) if spec is not None else (128, "int8")
        classifier, counts = train(Path(data), config.tier_names, folds, *encoding)
    except (ConfigError, DataError, EncoderUnavailable) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    classifier.write(Path(output))
    tiers = dict(classifier.routes)
    for route, n in sorted(counts.items(), key=lambda kv: (tiers[kv[0]], kv[0])):
        print(f"  {route:<28} → {tiers[route]:<12} {n} prompts")
    accuracy = classifier.trained["cv_tier_accuracy"]
    if accuracy is not None:
        print(f"{folds}-fold cross-validated tier accuracy: {accuracy:.1%}")
    print(
        f"wrote {output}: {len(classifier.routes)} routes from {classifier.trained['items']} prompts"
    )
    print(f"use it: semantic: {{classifier: {output}}} in a routing config (a path relative to it)")
    return 0
