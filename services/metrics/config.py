"""Metrics settings: ``SWITCHBOARD_*`` environment variables (see services/common/settings.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator

from schemas.topics import DEFAULT_DATABASE
from services.common.settings import ENV_PREFIX, CommonSettings, refuse_password_in_url


class MetricsSettings(CommonSettings):
    clickhouse_url: str | None = Field(
        default=None,
        description=(
            "Where events are written: `http(s)://host:8123` for a ClickHouse server (its user "
            "and password in clickhouse_user and clickhouse_password, never in the URL), "
            "`chdb:///<absolute dir>` for in-process ClickHouse (chDB). "
            "Unset: chDB in `<data_dir>/chdb`."
        ),
    )
    clickhouse_user: str | None = Field(
        default=None, description="User of the ClickHouse server (unset: the server's `default`)."
    )
    clickhouse_password: SecretStr | None = Field(
        default=None, description="Password of clickhouse_user."
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

    @field_validator("clickhouse_url")
    @classmethod
    def _no_password_in_url(cls, url: str | None) -> str | None:
        return refuse_password_in_url(url, "clickhouse_url", "SWITCHBOARD_CLICKHOUSE_PASSWORD")

    @model_validator(mode="after")
    def _endpoint_is_guarded(self) -> Self:
        """The query endpoint answers SQL over every table: reachable from other hosts only
        with a token."""
        if self.metrics_port and self.metrics_token is None and not is_loopback(self.metrics_host):
            raise ValueError(
                f"{ENV_PREFIX}METRICS_HOST={self.metrics_host} serves the SQL query endpoint "
                f"beyond this host without a token: set {ENV_PREFIX}METRICS_TOKEN (or the secret "
                f"file /run/secrets/switchboard_metrics_token), bind it to 127.0.0.1, or turn it "
                f"off with {ENV_PREFIX}METRICS_PORT=0"
            )
        return self

    @property
    def store_credentials(self) -> dict[str, str]:
        """``username``/``password`` for clickhouse_connect.get_client, those that are set."""
        out = {}
        if self.clickhouse_user:
            out["username"] = self.clickhouse_user
        if self.clickhouse_password is not None:
            out["password"] = self.clickhouse_password.get_secret_value()
        return out

    @property
    def store_url(self) -> str:
        return self.clickhouse_url or f"chdb://{(self.data_dir / 'chdb').resolve()}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
