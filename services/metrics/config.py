"""Metrics settings: ``SWITCHBOARD_*`` environment variables (see services/common/settings.py)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from schemas.topics import DEFAULT_DATABASE
from services.common.settings import CommonSettings


class MetricsSettings(CommonSettings):
    clickhouse_url: str | None = Field(
        default=None,
        description=(
            "Where events are written: `http(s)://user:password@host:8123` for a ClickHouse "
            "server, `chdb:///<absolute dir>` for in-process ClickHouse (chDB). "
            "Unset: chDB in `<data_dir>/chdb`."
        ),
    )
    data_dir: Path = Field(
        default=Path(".switchboard"), description="Local state of the embedded stack."
    )
    clickhouse_database: str = Field(
        default=DEFAULT_DATABASE, description="Database of llm_events."
    )
    batch_size: int = Field(
        default=20_000,
        ge=1,
        le=100_000,
        description="Events per insert, at most: bigger inserts make fewer parts for ClickHouse to merge.",
    )
    insert_linger_ms: int = Field(
        default=1000,
        ge=0,
        le=60_000,
        description=(
            "How long a batch collects events before it is inserted (ends early at batch_size): "
            "every insert is a new part for ClickHouse to merge, so a trickle of events is "
            "written once a second rather than on every poll. Rows are queryable that much later."
        ),
    )
    payload_retention_days: int = Field(
        default=7,
        ge=1,
        le=3650,
        description="How long captured inputs and outputs (llm_payloads) are kept.",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Bind address of the query endpoint."
    )
    metrics_port: int = Field(
        default=8091, ge=0, le=65535, description="Port of the read-only query endpoint (0: off)."
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the query endpoint requires (set by `switchboard up`).",
    )

    @property
    def store_url(self) -> str:
        return self.clickhouse_url or f"chdb://{(self.data_dir / 'chdb').resolve()}"
