"""The low-volume record topics and the tables they fill: one schema, one table and one row
shape each. Pure: the handler (services/metrics/handlers.py) parses and inserts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from schemas.control import CapturedPayload, ControlDecision, Feedback, ShadowComparison
from schemas.topics import DECISIONS_TABLE, FEEDBACK_TABLE, PAYLOADS_TABLE, SHADOW_TABLE, Topics
from services.common.sql import tenant_hash


@dataclass(frozen=True)
class RecordTable:
    schema: type[BaseModel]
    table: str
    columns: tuple[str, ...]
    key: str  # the field that identifies a record: a record read twice is one row
    row: Callable[[Any], list[Any]]
    checked: bool = False  # feedback: its request must exist and be the same tenant's


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


_FEEDBACK_COLUMNS = (
    "ts", "feedback_id", "request_id", "tenant_hash", "score", "label", "comment", "source",
)  # fmt: skip


def _feedback_row(f: Feedback) -> list[Any]:
    return [f.at, f.feedback_id, f.request_id, tenant_hash(f.tenant), f.score,
            f.label or "", f.comment, f.source]  # fmt: skip


_PAYLOAD_COLUMNS = (
    "ts", "payload_id", "request_id", "tenant_hash", "tier", "rule", "config_hash", "model",
    "kind", "text", "redactions",
)  # fmt: skip


def _payload_row(p: CapturedPayload) -> list[Any]:
    return [getattr(p, name) for name in _PAYLOAD_COLUMNS]


# How long feedback may wait for its request's row (events are written about a second after the
# answer) before an unknown request id is refused.
UNKNOWN_AFTER_S = 30.0


class NotYet(Exception):
    """Feedback for a request whose row may not be written yet: try the batch again."""


def feedback_refusals(
    feedback: Sequence[Feedback], tenants: Mapping[str, str], now: datetime
) -> list[str | None]:
    """Per record, why it is refused, or None. ``tenants`` is each known request id's
    tenant hash (llm_events). Raises ``NotYet`` while a recent one's request is unknown."""
    out: list[str | None] = []
    for f in feedback:
        known = tenants.get(f.request_id)
        if known is None:
            if (now - f.at).total_seconds() < UNKNOWN_AFTER_S:
                raise NotYet(f.request_id)
            out.append(f"request_id: no request {f.request_id!r} was answered (in the last 7 days)")
        elif known != tenant_hash(f.tenant):
            out.append(f"tenant: request {f.request_id!r} was not made for this tenant")
        else:
            out.append(None)
    return out


def record_tables(topics: Topics) -> dict[str, RecordTable]:
    """Topic → what its records are and where they go."""
    return {
        topics.decisions: RecordTable(
            ControlDecision, DECISIONS_TABLE, _DECISION_COLUMNS, "decision_id", _decision_row
        ),
        topics.shadow_comparisons: RecordTable(
            ShadowComparison, SHADOW_TABLE, _SHADOW_COLUMNS, "comparison_id", _shadow_row
        ),
        topics.payloads: RecordTable(
            CapturedPayload, PAYLOADS_TABLE, _PAYLOAD_COLUMNS, "payload_id", _payload_row
        ),
        topics.feedback: RecordTable(
            Feedback, FEEDBACK_TABLE, _FEEDBACK_COLUMNS, "feedback_id", _feedback_row, checked=True
        ),
    }


def dedup_token(keys: Sequence[str]) -> str:
    """The same records → the same token, in any order."""
    return hashlib.sha256("\x00".join(sorted(keys)).encode()).hexdigest()
