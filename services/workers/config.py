"""Worker settings: ``SWITCHBOARD_*`` environment variables (see services/common/settings.py)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class WorkerSettings(CommonSettings):
    tier: str = Field(
        default="", description="Tier this worker serves (`switchboard worker --tier`)."
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="In-flight requests; default: the tier's setting.",
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight calls may finish."
    )
