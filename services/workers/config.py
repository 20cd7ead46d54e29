"""Worker settings: ``SWITCHBOARD_*`` environment variables (see services/common/settings.py)."""

from __future__ import annotations

from pydantic import Field, field_validator

from services.common.settings import CommonSettings, refuse_password_in_url


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
    outcome_ttl_s: int = Field(
        default=24 * 3600,
        ge=60,
        description=(
            "How long a final outcome is kept to answer a resend with the same key (or a "
            "redelivery) without another model call. Redis holds about one outcome per request "
            "for this long: README 'Sizing Redis'."
        ),
    )
    outcome_redis_url: str | None = Field(
        default=None,
        description=(
            "A Redis for outcomes alone (a cache that may evict: maxmemory with allkeys-lru). "
            "Unset: outcomes share redis_url with the leases and notes, which must never be "
            "evicted."
        ),
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight calls may finish."
    )
    worker_host: str = Field(
        default="127.0.0.1",
        description=(
            "Bind address of `GET /health` and `GET /ready` (0.0.0.0 when a probe comes from "
            "outside the container, e.g. Kubernetes)."
        ),
    )
    worker_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description=(
            "Port of `GET /health` and `GET /ready` (0: no HTTP server). Off by default: several "
            "workers often share a host (`switchboard up` gives each its own port)."
        ),
    )

    @field_validator("outcome_redis_url")
    @classmethod
    def _no_password_in_outcome_url(cls, url: str | None) -> str | None:
        return refuse_password_in_url(url, "outcome_redis_url", "SWITCHBOARD_REDIS_PASSWORD")
