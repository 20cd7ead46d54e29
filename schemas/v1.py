"""Version 1 of every message that crosses a process boundary.

Readers tolerate unknown fields (``extra="ignore"``) so producers can add optional fields
within a version. A breaking change is a new module (``v2``) and new topics.

Flow::

    ChatRequest ──router──▶ RoutedRequest ──worker──▶ ChatResult | ChatError  (reply topic)
                                               └────▶ AttemptEvent             (events topic)
    anything unreadable ─────────────────────▶ DeadLetter                     (dead-letter topic)
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION: Literal[1] = 1
AUTO_MODEL = "switchboard/auto"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_request_id() -> str:
    return f"sbr-{uuid.uuid4().hex}"


class _Message(BaseModel):
    """Base of the wire contracts: unknown fields are ignored, instances are immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class TextPart(_Message):
    type: Literal["text"]
    text: str


class ImageURL(_Message):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Message):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Message):
    """One OpenAI-shaped chat message; ``content`` is text or a list of text/image parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_count(self) -> int:
        if not isinstance(self.content, list):
            return 0
        return sum(1 for p in self.content if isinstance(p, ImagePart))


class RequestMetadata(_Message):
    """What the caller tells the router about a request; every field is optional."""

    tenant: str | None = Field(default=None, max_length=200)
    task: str | None = Field(default=None, max_length=200)
    requires_reasoning: bool = False
    priority: int = Field(default=0, ge=0, le=9)
    deadline_ms: int | None = Field(
        default=None,
        gt=0,
        description="Time budget in milliseconds from when the router accepts it.",
    )
    idempotency_key: str | None = Field(default=None, max_length=200)
    tags: dict[str, str] = Field(default_factory=dict)


class ChatRequest(_Message):
    """A chat completion request as a producer sends it (HTTP body or ingress topic)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=200)
    model: str = AUTO_MODEL
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    metadata: RequestMetadata = Field(default_factory=RequestMetadata)

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        return ""


class RoutedRequest(_Message):
    """A request after classification, as published to a tier topic."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request: ChatRequest
    tier: str
    rule: str = Field(description="Name of the rule that chose the tier, or 'default' / 'forced'.")
    config_hash: str
    attempt: int = Field(
        default=0, ge=0, description="0 on first routing; +1 per cross-tier fallback."
    )
    routed_at: datetime = Field(default_factory=utcnow)
    deadline_at: datetime | None = None
    reply_to: str = Field(description="Topic the worker publishes the ChatResult/ChatError to.")

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Usage(_Message):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatResult(_Message):
    """A successful answer: ``completion`` is the OpenAI chat.completion object."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["result"] = "result"
    request_id: str
    tenant: str | None = None
    tier: str
    model: str
    provider: str
    rule: str
    config_hash: str
    attempts: int = Field(description="Model calls made for this request, failed ones included.")
    latency_ms: float
    completion: dict[str, Any]
    usage: Usage
    cost_usd: float = 0.0
    completed_at: datetime = Field(default_factory=utcnow)


class ChatError(_Message):
    """A request that could not be answered; ``code`` is stable, ``message`` is for people."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["error"] = "error"
    request_id: str
    tenant: str | None = None
    tier: str | None = None
    model: str | None = None
    rule: str | None = None
    config_hash: str | None = None
    code: str
    message: str
    retryable: bool = False
    attempts: int = 0
    completed_at: datetime = Field(default_factory=utcnow)


Outcome = Annotated[ChatResult | ChatError, Field(discriminator="kind")]

AttemptStatus = Literal["ok", "error", "timeout", "rate_limited", "skipped"]


class AttemptEvent(_Message):
    """One model attempt, as written to ClickHouse. Never carries prompt or response text."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    ts: datetime = Field(default_factory=utcnow)
    request_id: str
    tier: str
    model: str
    provider: str
    rule: str
    config_hash: str
    attempt: int = Field(ge=0, description="0-based index of this call within the request.")
    status: AttemptStatus
    error_code: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    cost_usd: float = 0.0
    response_sha256: str = ""
    tenant_hash: str = ""

    @field_validator("latency_ms", "cost_usd")
    @classmethod
    def _non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must be >= 0")
        return value


class DeadLetter(_Message):
    """A message a consumer could not process, with the reason, so its partition keeps moving."""

    schema_version: Literal[1] = SCHEMA_VERSION
    source_topic: str
    partition: int
    offset: int
    consumer: str
    reason: str
    error_type: str
    payload: str = Field(description="The original bytes, decoded as UTF-8 with replacement, cut.")
    payload_bytes: int
    truncated: bool
    failed_at: datetime = Field(default_factory=utcnow)
