"""Router settings: ``SWITCHBOARD_*`` environment variables (see services/common/settings.py)."""

from __future__ import annotations

import uuid

from pydantic import Field, SecretStr

from schemas.topics import DEFAULT_DATABASE
from services.common.settings import CommonSettings
from services.router.domain.images import MAX_IMAGE_BYTES


class RouterSettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Bind address of the HTTP API.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port of the HTTP API.")
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer key the HTTP API requires. `switchboard up` generates one when unset.",
    )
    instance_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex[:12],
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Names this router's reply topic; unique per running router.",
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest HTTP request body accepted."
    )
    max_image_bytes: int = Field(
        default=MAX_IMAGE_BYTES,
        ge=1024,
        description="Largest inline (data URL) image accepted, in decoded bytes; HTTP and ingress.",
    )
    ingress_batch: int = Field(
        default=2000,
        ge=1,
        le=100_000,
        description="Ingress requests routed, published and committed together, at most.",
    )
    reply_generation_size: int = Field(
        default=0,
        ge=0,
        description=(
            "Requests per reply-topic generation; 0 keeps one reply topic for the router's life "
            "(Kafka's retention bounds it). `switchboard up` sets it for the embedded broker, "
            "which keeps every answer and slows down as a partition fills."
        ),
    )
    ready_stall_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "GET /ready turns 503 when callers have waited this long with no answer arriving "
            "at all: above the slowest answer a tier can take, so a lone long request is no stall."
        ),
    )
    max_waiting: int = Field(
        default=5000,
        ge=1,
        description=(
            "HTTP requests that may wait for their answers at once; past it a request gets 503 "
            "with Retry-After instead of joining a queue that only grows."
        ),
    )
    metrics_url: str | None = Field(
        default=None,
        description=(
            "The metrics service's query endpoint, where POST /v1/feedback checks that a request "
            "exists and is the caller's tenant's (`switchboard up` sets it). Unset: feedback "
            "answers 503."
        ),
    )
    metrics_token: SecretStr | None = Field(
        default=None, description="Bearer token of the metrics query endpoint."
    )
    clickhouse_database: str = Field(
        default=DEFAULT_DATABASE, description="Database of llm_events (for the feedback check)."
    )
    feedback_wait_s: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description=(
            "How long POST /v1/feedback waits for its request's rows before answering 404 (rows "
            "follow an answer by about a second)."
        ),
    )
    semantic_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "CPU threads the semantic stage's encoder uses per batch; one leaves the other cores "
            "to the HTTP and Kafka work of the same process."
        ),
    )
    semantic_max_batch: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Texts the semantic stage encodes together at most, when requests queue.",
    )
    reply_grace_s: float = Field(
        default=5.0, ge=0, description="How long past a request's deadline the router still waits."
    )
