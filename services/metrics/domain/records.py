"""The low-volume record topics and the tables they fill: one schema, one table and one row
shape each. Pure: the handler (services/metrics/handlers.py) parses and inserts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from schemas.control import ControlDecision, ShadowComparison
from schemas.topics import DECISIONS_TABLE, SHADOW_TABLE, Topics


@dataclass(frozen=True)
class RecordTable:
    schema: type[BaseModel]
    table: str
    columns: tuple[str, ...]
    key: str  # the field that identifies a record: a record read twice is one row
    row: Callable[[Any], list[Any]]


def _decision_row(d: ControlDecision) -> list[Any]:
    figures = json.dumps(d.figures, sort_keys=True, default=str)
    return [d.decided_at, d.decision_id, d.experiment, d.tier, d.candidate, d.action,
            d.share_from, d.share_to, d.reason, list(d.criteria), figures, d.by,
            d.config_hash]  # fmt: skip


_DECISION_COLUMNS = (
    "decided_at", "decision_id", "experiment", "tier", "candidate", "action", "share_from",
    "share_to", "reason", "criteria", "figures", "by", "config_hash",
)  # fmt: skip
_SHADOW_COLUMNS = tuple(name for name in ShadowComparison.model_fields if name != "schema_version")


def _shadow_row(c: ShadowComparison) -> list[Any]:
    return [getattr(c, name) for name in _SHADOW_COLUMNS]


def record_tables(topics: Topics) -> dict[str, RecordTable]:
    """Topic → what its records are and where they go."""
    return {
        topics.decisions: RecordTable(
            ControlDecision, DECISIONS_TABLE, _DECISION_COLUMNS, "decision_id", _decision_row
        ),
        topics.shadow_comparisons: RecordTable(
            ShadowComparison, SHADOW_TABLE, _SHADOW_COLUMNS, "comparison_id", _shadow_row
        ),
    }


def dedup_token(keys: Sequence[str]) -> str:
    """The same records → the same token, in any order."""
    return hashlib.sha256("\x00".join(sorted(keys)).encode()).hexdigest()
