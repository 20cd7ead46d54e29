"""Settings every service reads, from ``SWITCHBOARD_*`` environment variables.

Each service extends ``CommonSettings`` with its own fields (services/*/config.py). All of them
share one prefix so one ``.env`` or compose ``environment:`` block configures the fleet.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import DEFAULT_PREFIX, Topics

ENV_PREFIX = "SWITCHBOARD_"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

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
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis for result de-duplication."
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

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

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
