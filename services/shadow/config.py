"""Shadow worker settings: ``SWITCHBOARD_*`` environment variables (services/common/settings.py)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class ShadowSettings(CommonSettings):
    shadow_concurrency: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description=(
            "Mirrored requests handled at once. Each experiment's `max_in_flight` bounds its "
            "candidate calls within this; what arrives past it is dropped and counted."
        ),
    )
    drain_timeout_s: float = Field(
        default=10.0, ge=0, description="On SIGTERM, how long in-flight shadow calls may finish."
    )
    shadow_host: str = Field(
        default="127.0.0.1", description="Bind address of `GET /health` and `GET /ready`."
    )
    shadow_port: int = Field(
        default=0, ge=0, le=65535, description="Port of `GET /health` and `GET /ready` (0: off)."
    )
