"""Controller settings: ``SWITCHBOARD_*`` environment variables (see services/common/settings.py)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from schemas.topics import DEFAULT_DATABASE
from services.common.settings import CommonSettings


class ControllerSettings(CommonSettings):
    metrics_url: str = Field(
        default="http://127.0.0.1:8091",
        description=(
            "The metrics service's query endpoint, where the controller reads each window's "
            "figures (any metrics instance: they all read the same ClickHouse)."
        ),
    )
    metrics_token: SecretStr | None = Field(
        default=None, description="Bearer token of the query endpoint (set by `switchboard up`)."
    )
    clickhouse_database: str = Field(
        default=DEFAULT_DATABASE, description="Database of llm_events."
    )
    controller_host: str = Field(
        default="127.0.0.1", description="Bind address of `GET /health` and `GET /ready`."
    )
    controller_port: int = Field(
        default=8092, ge=0, le=65535, description="Port of `GET /health` and `GET /ready` (0: off)."
    )
    controller_tick_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often the controller looks for an experiment whose interval is due.",
    )
    query_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="How long a figures query may take."
    )
