"""Settings every service reads, from ``SWITCHBOARD_*`` environment variables.

Each service extends ``CommonSettings`` with its own fields (services/*/config.py). All of them
share one prefix so one ``.env`` or compose ``environment:`` block configures the fleet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import DEFAULT_PREFIX, Topics
from services.common.topic_layout import DEFAULT_MAX_MESSAGE_BYTES, TopicLayout

ENV_PREFIX = "SWITCHBOARD_"
# Secret files: compose `secrets:` and Kubernetes Secret volumes mount them here. A setting is read
# from the file named like its variable in lower case (/run/secrets/switchboard_redis_password),
# when the variable itself is unset. Only looked at when the directory exists.
SECRETS_DIR = Path("/run/secrets")
MIB = 1024 * 1024


def secrets_dir() -> Path | None:
    return SECRETS_DIR if SECRETS_DIR.is_dir() else None


def url_password(url: str) -> str | None:
    """The password inside ``url`` (``scheme://user:password@host``), or None."""
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def refuse_password_in_url(url: str | None, field: str, instead: str) -> str | None:
    """Credentials arrive as their own variables or secret files: ``docker inspect``, ``ps`` and
    logs show a URL, and a URL with a password in it shows the password."""
    if url and url_password(url):
        raise ValueError(
            f"{ENV_PREFIX}{field.upper()} carries a password; put it in {instead} "
            f"(or the secret file {SECRETS_DIR}/{instead.lower()}) and leave it out of the URL"
        )
    return url


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        secrets_dir=secrets_dir(),
        # a refused value is not repeated in the error: it may be a password
        hide_input_in_errors=True,
    )

    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated."
    )
    topic_prefix: str = Field(
        default=DEFAULT_PREFIX, description="Prefix of every topic and consumer group name."
    )
    partitions: int = Field(
        default=4, ge=1, le=256, description="Partitions of the topics a service creates on start."
    )
    config: Path = Field(
        default=Path("config/simulated.yaml"), description="Path of the routing config file."
    )
    replication_factor: int = Field(
        default=1,
        ge=1,
        le=7,
        description=(
            "Copies of each topic's partitions on the brokers: 1 for the embedded broker, 3 in "
            "production (docker-compose.yml, deploy/k8s). Applies when a topic is created."
        ),
    )
    min_insync_replicas: int = Field(
        default=1,
        ge=1,
        le=7,
        description=(
            "Copies a write must reach before the broker acknowledges it (producers use "
            "acks=all): 2 with 3 replicas keeps writes safe through one broker's loss."
        ),
    )
    retention_hours: int = Field(
        default=168,
        ge=1,
        le=24 * 365,
        description=(
            "How long the tier, ingress, results, dead-letter, events and payload topics keep "
            "records. They hold raw prompts and answers: this is how long Kafka keeps them."
        ),
    )
    reply_retention_minutes: int = Field(
        default=60,
        ge=1,
        le=24 * 60,
        description=(
            "How long a router's reply topic keeps answers (they are read within seconds), and "
            "how long a reply topic no router has used stays before routers delete it."
        ),
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        ge=MIB,
        le=100 * MIB,
        description=(
            "Largest Kafka record: topics' max.message.bytes, producers' request size and "
            "consumers' fetch sizes all follow it. The brokers' message.max.bytes and "
            "replica.fetch.max.bytes must be at least this."
        ),
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis for leases and delivery notes; no password in it (redis_password).",
    )
    redis_password: SecretStr | None = Field(
        default=None,
        description="Password of the Redis servers (both redis_url and outcome_redis_url).",
    )
    fetch_wait_interactive_ms: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Consumer fetch wait for latency-sensitive topics (interactive tiers, replies).",
    )
    fetch_wait_batch_ms: int = Field(
        default=100, ge=0, le=5000, description="Consumer fetch wait for throughput topics."
    )
    kafka_session_timeout_ms: int = Field(
        default=6_000,
        ge=1_000,
        le=300_000,
        description=(
            "How long a consumer-group member may go without a heartbeat before its partitions "
            "go to the others: how long a crashed worker's queue waits. Kafka brokers refuse "
            "values outside group.min/max.session.timeout.ms (6 s to 30 min by default)."
        ),
    )
    run_dir: Path | None = Field(
        default=None,
        description=(
            "Directory of the embedded broker's write holds (set by `switchboard up`) and of the "
            "ready markers the benchmarks wait on."
        ),
    )
    embedded_broker: bool = Field(
        default=False,
        description=(
            "The broker is the embedded Tansu (`switchboard up` sets it): publishers wait while "
            "`switchboard up`'s keeper compacts their topic (services/common/fences.py). Needs run_dir."
        ),
    )
    kafka_idempotence: bool = Field(
        default=True,
        description=(
            "Idempotent producers (Kafka drops a record a producer retry sent twice). Always off "
            "on the embedded broker, which has none; set false for any other broker without them."
        ),
    )
    reload_on_sighup: bool = Field(
        default=True,
        description=(
            "SIGHUP makes the service read its config file again and apply it if it is valid "
            "(services/common/config_watch.py)."
        ),
    )
    log_level: str = Field(default="INFO", description="Python log level.")

    @field_validator("redis_url")
    @classmethod
    def _no_password_in_redis_url(cls, url: str) -> str:
        refuse_password_in_url(url, "redis_url", "SWITCHBOARD_REDIS_PASSWORD")
        return url

    @model_validator(mode="after")
    def _replicas_fit(self) -> Self:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"{ENV_PREFIX}MIN_INSYNC_REPLICAS={self.min_insync_replicas} is more than "
                f"{ENV_PREFIX}REPLICATION_FACTOR={self.replication_factor}: no write could succeed"
            )
        return self

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def topic_layout(self) -> TopicLayout:
        """Every topic's partitions' replicas, retention and sizes (``switchboard topics``)."""
        return TopicLayout.of(self)

    @property
    def idempotent_producer(self) -> bool:
        return self.kafka_idempotence and not self.embedded_broker

    def mark_ready(self, name: str, detail: str = "") -> None:
        """Write ``<run_dir>/ready/<name>`` once this process can work (no-op without run_dir).

        The benchmarks and fault scenarios (bench/, faults/) wait on these files; `switchboard up`
        and orchestrators ask the service's ``GET /ready`` instead, which also turns back to 503.
        """
        if self.run_dir is None:
            return
        ready = self.run_dir / "ready"
        ready.mkdir(parents=True, exist_ok=True)
        tmp = ready / f".{name}.tmp"
        tmp.write_text(detail)
        tmp.replace(ready / name)
