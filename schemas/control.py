"""Version 1 of the control plane's messages: experiment state and the controller's decisions.

Flow::

    controller / `switchboard canary` ──▶ ExperimentState   (control topic, compacted: the last
                                     │                       record of each experiment counts)
                                     └─▶ ControlDecision    (decisions topic ─metrics─▶ ClickHouse
                                                             switchboard.decisions)

Routers read the control topic from its start and apply the newest state of each experiment:
its share says which requests go to the candidate (services/common/experiments.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from schemas.v1 import MAX_NAME, SCHEMA_VERSION, _Message, utcnow

# running: the controller moves the share by the criteria; paused: nobody moves it but an
# operator; rolled_back: share 0 until an operator promotes again; completed: the last step held
ExperimentStatus = Literal["running", "paused", "rolled_back", "completed"]
Action = Literal["start", "promote", "hold", "rollback", "complete", "pause", "resume"]


class ExperimentState(_Message):
    """Where one experiment stands: the share in force and why (keyed by the experiment name)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    experiment: str = Field(min_length=1, max_length=MAX_NAME)
    candidate: str = Field(
        min_length=1,
        max_length=200,
        description="The candidate's label: a state about another candidate (the config "
        "changed) is not applied.",
    )
    share_pct: float = Field(ge=0, le=100, allow_inf_nan=False)
    step: int = Field(ge=-1, description="Index into the experiment's steps; -1 after a rollback.")
    status: ExperimentStatus
    since: datetime = Field(
        default_factory=utcnow, description="When this share took effect: the window's start."
    )
    version: int = Field(default=0, ge=0, description="+1 per change; the newest wins.")
    reason: str = Field(default="", max_length=2000)
    by: str = Field(default="", max_length=200, description="Controller instance or 'operator'.")


class ControlDecision(_Message):
    """One evaluation of an experiment, and what came of it (a row of switchboard.decisions)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    decision_id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=100)
    decided_at: datetime = Field(default_factory=utcnow)
    experiment: str = Field(min_length=1, max_length=MAX_NAME)
    tier: str = Field(max_length=100)
    candidate: str = Field(max_length=200)
    action: Action
    share_from: float = Field(ge=0, le=100, allow_inf_nan=False)
    share_to: float = Field(ge=0, le=100, allow_inf_nan=False)
    reason: str = Field(max_length=4000)
    criteria: list[str] = Field(default_factory=list, description="Each criterion and its verdict.")
    figures: dict[str, Any] = Field(
        default_factory=dict, description="The window's figures per variant, as evaluated."
    )
    by: str = Field(default="", max_length=200)
    config_hash: str = Field(default="", max_length=100)
