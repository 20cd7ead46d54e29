"""The file ``switchboard train`` writes and the semantic stage reads: a softmax over routes.

JSON, so a reviewer can read which routes and tiers it holds and how it was trained. The
routing config names it (``semantic.classifier``); its content is part of the config's hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CLASSIFIER_FORMAT = "switchboard-route-classifier/1"
DIMENSIONS = 384  # all-MiniLM-L6-v2's vectors
# The signals a classifier may read (services/router/domain/semantic.py SIGNALS computes them).
KNOWN_SIGNALS = (
    "has_code",
    "has_math",
    "reasoning_markers",
    "multi_step",
    "complexity",
    "prompt_chars",
)


@dataclass(frozen=True)
class ClassifierFile:
    """A classifier as ``switchboard train`` writes it (JSON), before its tiers are checked."""

    model: str
    routes: list[tuple[str, str]]  # (route, tier)
    weights: np.ndarray
    bias: np.ndarray
    trained: dict[str, Any]
    signals: tuple[str, ...] = ()  # cheap signals read after the vector, in this order
    precision: str = "int8"  # of the encoder whose vectors it was fitted on
    digest: str = ""  # sha256 of the file read, for the config hash

    @classmethod
    def read(cls, path: Path) -> ClassifierFile:
        try:
            raw = path.read_bytes()
            data = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read classifier {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != CLASSIFIER_FORMAT:
            raise ValueError(f"{path} is not a {CLASSIFIER_FORMAT} file (switchboard train)")
        try:
            routes = [(str(r["route"]), str(r["tier"])) for r in data["routes"]]
            weights = np.asarray(data["weights"], np.float32)
            bias = np.asarray(data["bias"], np.float32)
            trained = dict(data.get("trained", {}))
            signals = tuple(str(name) for name in data.get("signals", ()))
            precision = str(data.get("precision", "fp32"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed classifier: {exc}") from exc
        unknown = sorted(set(signals) - set(KNOWN_SIGNALS))
        if unknown:
            raise ValueError(f"{path}: unknown signal {', '.join(unknown)}")
        width = DIMENSIONS + len(signals)
        if weights.ndim != 2 or weights.shape != (len(routes), width):
            raise ValueError(f"{path}: weights must be {len(routes)} rows of {width}")
        if bias.shape != (len(routes),):
            raise ValueError(f"{path}: bias must hold {len(routes)} numbers")
        digest = hashlib.sha256(raw).hexdigest()[:16]
        return cls(str(data["model"]), routes, weights, bias, trained, signals, precision, digest)

    def write(self, path: Path) -> None:
        data: dict[str, Any] = {
            "format": CLASSIFIER_FORMAT,
            "model": self.model,
            "routes": [{"route": r, "tier": t} for r, t in self.routes],
            "signals": list(self.signals),
            "precision": self.precision,
            "weights": np.round(self.weights.astype(float), 6).tolist(),
            "bias": np.round(self.bias.astype(float), 6).tolist(),
            "trained": self.trained,
        }
        path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
