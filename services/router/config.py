"""Router settings: ``SWITCHBOARD_*`` environment variables (see services/common/settings.py)."""

from __future__ import annotations

import re
import socket
import uuid
from typing import Self

from pydantic import Field, SecretStr, model_validator

from schemas.topics import DEFAULT_DATABASE
from services.common.settings import ENV_PREFIX, CommonSettings
from services.router.domain.images import MAX_IMAGE_BYTES


class RouterSettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Bind address of the HTTP API.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port of the HTTP API.")
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer key the HTTP API requires. `switchboard up` generates one when unset.",
    )
    instance_id: str = Field(
        default_factory=lambda data: host_instance_id(data["port"]),
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description=(
            "Names this router's reply topic; unique per running router. Default: the host name "
            "(the container's or pod's) and the port, so a restarted router reads the reply "
            "topic it had; a random id when the port is 0 (any free port)."
        ),
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

    @model_validator(mode="after")
    def _body_fits_a_record(self) -> Self:
        """A request the door takes must fit in one Kafka record on the tier topic."""
        if self.max_body_bytes + ENVELOPE_BYTES > self.max_message_bytes:
            raise ValueError(
                f"{ENV_PREFIX}MAX_BODY_BYTES={self.max_body_bytes} leaves no room in a Kafka "
                f"record of {ENV_PREFIX}MAX_MESSAGE_BYTES={self.max_message_bytes}: keep the "
                f"body at least {ENVELOPE_BYTES} bytes under it (the routed request adds its "
                "routing fields)"
            )
        return self


# What routing adds to a request's body on its way to a tier topic, at most (its routing fields,
# ids and headers; measured under 2 KiB), with room to spare.
ENVELOPE_BYTES = 64 * 1024


def host_instance_id(port: int) -> str:
    """The host's name (a compose container's id, a Kubernetes pod's name) and ``port``: what
    stays the same when the router restarts there, and differs between routers sharing a host."""
    if not port:
        return uuid.uuid4().hex[:12]
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()).strip("-")[:50] or "router"
    return f"{host}-{port}"
