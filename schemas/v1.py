"""Version 1 of every message that crosses a process boundary.

Readers tolerate unknown fields (``extra="ignore"``) so producers can add optional fields
within a version. A breaking change is a new module (``v2``) and new topics.

Flow::

    ChatRequest ──router──▶ RoutedRequest ──worker──▶ ChatResult | ChatError  (reply topic)
                                               ├────▶ StreamChunk…  (before it, if streamed)
                                               └────▶ AttemptEvent             (events topic)
    a streaming client that left ──router──▶ CancelRequest                    (cancel topic)
    anything unreadable ─────────────────────▶ DeadLetter                     (dead-letter topic)
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Literal[1] = 1
AUTO_MODEL = "switchboard/auto"

# Bounds of the numbers in the contracts (README "Limits"): a value outside them is refused by
# name (HTTP 400, or a dead letter and a ChatError on Kafka) instead of failing later.
MAX_DEADLINE_MS = 7 * 24 * 3600 * 1000  # a week: long enough for any queued job
MAX_TOKENS = 1_000_000  # above every model's output limit
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_TAGS = 32
MAX_FALLBACKS = 8  # cross-tier re-routes of one request (RoutedRequest.attempt)
TOKEN_COUNT_MAX = 2**32 - 1  # ClickHouse UInt32 (tokens_in, tokens_out)
ATTEMPT_MAX = 2**16 - 1  # ClickHouse UInt16 (attempt)


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


# OpenAI's rule for function and JSON-schema names
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128  # OpenAI's limit on the tools of one request
MAX_CHOICES = 128  # OpenAI's limit on ``n``
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on ``top_logprobs``
MAX_LOGIT_BIAS = 300  # OpenAI's limit on the tokens of ``logit_bias``
# OpenAI's limits on a request's own ``metadata`` pairs (what Switchboard passes to the model)
MAX_PROVIDER_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class FunctionCall(_Message):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class ToolCall(_Message):
    """A call the model asked for, in an assistant message (and in an answer)."""

    id: str = Field(min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Message):
    """One OpenAI-shaped chat message; ``content`` is text or a list of text/image parts.

    An assistant message may carry the ``tool_calls`` the model asked for; a ``tool`` message
    answers one of them by ``tool_call_id``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=200)
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _tool_fields_where_they_belong(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message carries 'tool_calls'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the 'tool_call_id' it answers")
        return self

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
    """What the caller tells the router about a request; every field is optional.

    Any other key is OpenAI's ``metadata`` (string pairs for the provider): Switchboard passes
    those to a model that takes ``metadata`` and refuses the request by name for one that does
    not (``provider_metadata``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    tenant: str | None = Field(default=None, max_length=200)
    task: str | None = Field(default=None, max_length=200)
    requires_reasoning: bool = False
    priority: int = Field(default=0, ge=0, le=9)
    deadline_ms: int | None = Field(
        default=None,
        gt=0,
        le=MAX_DEADLINE_MS,
        description="Time budget in milliseconds from when the router accepts it (at most a week).",
    )
    idempotency_key: str | None = Field(default=None, max_length=200)
    tags: dict[str, Annotated[str, Field(max_length=500)]] = Field(
        default_factory=dict, max_length=MAX_TAGS
    )

    @model_validator(mode="after")
    def _provider_metadata_as_openai_allows(self) -> RequestMetadata:
        extra = self.model_extra or {}
        if len(extra) > MAX_PROVIDER_METADATA:
            raise ValueError(
                f"at most {MAX_PROVIDER_METADATA} metadata pairs besides Switchboard's own "
                f"fields ({len(extra)} sent)"
            )
        for key, value in extra.items():
            if len(key) > MAX_METADATA_KEY:
                raise ValueError(f"metadata key {key[:80]!r} is over {MAX_METADATA_KEY} characters")
            if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
                raise ValueError(
                    f"metadata {key!r} must be a string of at most {MAX_METADATA_VALUE} "
                    "characters (Switchboard's own keys: tenant, task, requires_reasoning, "
                    "priority, deadline_ms, idempotency_key, tags)"
                )
        return self

    @property
    def provider_metadata(self) -> dict[str, str]:
        """The keys that are not Switchboard's: OpenAI's ``metadata``, for the model."""
        return dict(self.model_extra or {})


class FunctionDefinition(_Message):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="The arguments' JSON Schema."
    )
    strict: bool | None = None


class Tool(_Message):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Message):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Message):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaSpec(_Message):
    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        serialize_by_alias=True,  # "schema" on the wire; the attribute would shadow BaseModel's
        validate_by_name=True,
        validate_by_alias=True,
    )

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Message):
    type: Literal["text"]


class JSONObjectFormat(_Message):
    type: Literal["json_object"]


class JSONSchemaFormat(_Message):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")
]


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]

# OpenAI chat parameters Switchboard does not carry out yet, with the values that ask for nothing
# (what a client sends when it does not use the feature): any other value is refused by name.
UNSUPPORTED_PARAMETERS: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
}


def check_tool_choice(tools: list[Tool] | None, choice: ToolChoice | None) -> None:
    """A ``tool_choice`` that requires a tool needs ``tools``, and a named one one of them."""
    if choice is None or choice in ("none", "auto"):
        return
    names = {t.function.name for t in tools or ()}
    if not names:
        raise ValueError("'tool_choice' requires a tool, and 'tools' is empty")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ValueError(f"'tool_choice' names function '{choice.function.name}', not in 'tools'")


def check_stream_options(stream: bool | None, options: StreamOptions | None) -> None:
    if options is not None and not stream:
        raise ValueError("'stream_options' needs 'stream': true")


def check_logprobs(logprobs: bool | None, top_logprobs: int | None) -> None:
    if top_logprobs and not logprobs:
        raise ValueError("'top_logprobs' needs 'logprobs': true")


def _bias_in_range(bias: dict[str, float]) -> dict[str, float]:
    for token, value in bias.items():
        if not token.isdigit():
            raise ValueError(f"logit_bias keys are token ids (digits), not {token[:40]!r}")
        if not -100 <= value <= 100:
            raise ValueError(f"logit_bias[{token}] = {value} is outside -100..100")
    return bias


LogitBias = Annotated[
    dict[str, float], Field(max_length=MAX_LOGIT_BIAS), AfterValidator(_bias_in_range)
]

# Every OpenAI parameter a request may set that is sent to the model, in the order they are
# checked: the model must take each one set (litellm's supported parameters for its provider, or
# the config's ``capabilities.params``), or the request is refused by name. Nothing is dropped.
PASSED_PARAMETERS = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "reasoning_effort",
    "metadata",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
)


def asks_for_unsupported(name: str, value: Any) -> bool:
    """Does OpenAI parameter ``name`` set to ``value`` ask for something Switchboard does not do?"""
    return name in UNSUPPORTED_PARAMETERS and value not in UNSUPPORTED_PARAMETERS[name]


class StreamOptions(_Message):
    """Only ``include_usage`` is carried out; any other option is refused by name, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include_usage: bool = False


class ChatParameters(_Message):
    """The OpenAI chat parameters Switchboard carries out: the HTTP body's and the ingress
    record's. Unknown fields are kept (``model_extra``) so OpenAI parameters that would otherwise
    be dropped silently can be refused by name (``UNSUPPORTED_PARAMETERS``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, gt=0, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    user: str | None = Field(default=None, max_length=256)
    reasoning_effort: ReasoningEffort | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    stream: bool | None = Field(
        default=None, description="Answer with server-sent events (HTTP only)."
    )
    stream_options: StreamOptions | None = None
    metadata: RequestMetadata = Field(default_factory=RequestMetadata)


class ChatRequest(ChatParameters):
    """A chat completion request as a producer sends it (HTTP body or ingress topic). Unknown
    fields other than OpenAI's are ignored."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=200)
    model: str = Field(default=AUTO_MODEL, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _no_unsupported_parameters(self) -> ChatRequest:
        """OpenAI parameters Switchboard does not carry out are refused by name, not dropped."""
        for name, value in (self.model_extra or {}).items():
            if asks_for_unsupported(name, value):
                raise ValueError(f"'{name}' is not supported by Switchboard yet")
        check_tool_choice(self.tools, self.tool_choice)
        check_logprobs(self.logprobs, self.top_logprobs)
        check_stream_options(self.stream, self.stream_options)
        return self

    def model_parameters(self) -> dict[str, Any]:
        """The OpenAI parameters set on this request that the model is sent, by name (what a
        model must take, else the request is refused by name: ``PASSED_PARAMETERS``)."""
        out: dict[str, Any] = {}
        for name in PASSED_PARAMETERS:
            value = self.metadata.provider_metadata if name == "metadata" else getattr(self, name)
            if value is not None and value != {}:
                out[name] = value
        return out

    @property
    def token_cap(self) -> int | None:
        """The most tokens the answer may have, whichever of the two names set it."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def has_tools(self) -> bool:
        """The model is offered tools it may call."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def wants_json(self) -> bool:
        """The answer must be JSON (``json_object``) or match a JSON Schema (``json_schema``)."""
        return self.response_format is not None and self.response_format.type != "text"

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        return ""


Variant = Literal["baseline", "candidate", "shadow"]
MAX_NAME = 100  # experiment names (services/common/routing_config.py checks their form)


class ExperimentTag(_Message):
    """The experiment a request takes part in, and which side of it the request is on."""

    name: str = Field(min_length=1, max_length=MAX_NAME)
    variant: Variant
    share_pct: float = Field(
        ge=0, le=100, allow_inf_nan=False, description="The candidate's share when assigned."
    )


class RoutedRequest(_Message):
    """A request after classification, as published to a tier topic."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request: ChatRequest
    tier: str
    rule: str = Field(
        description="Name of the rule that chose the tier, 'semantic:<route>' when the "
        "semantic stage did, or 'default' / 'forced' / 'pinned'."
    )
    route_score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="The semantic stage's best score for this request, when the stage ran.",
    )
    config_hash: str
    pinned: str | None = Field(
        default=None,
        max_length=200,
        description="The label of the model the request named: only it answers, unless its "
        "config allows fallback (pinned_fallback).",
    )
    attempt: int = Field(
        default=0,
        ge=0,
        le=MAX_FALLBACKS,
        description="0 on first routing; +1 per cross-tier fallback.",
    )
    routed_at: datetime = Field(default_factory=utcnow)
    deadline_at: datetime | None = None
    reply_to: str = Field(description="Topic the worker publishes the ChatResult/ChatError to.")
    outcome_key: str | None = Field(
        default=None,
        max_length=200,
        description="Where the worker keeps the final outcome, scoped to the tenant or the "
        "producer's key: a resend with the same request id in that scope is answered from it. "
        "None: the request id.",
    )
    fingerprint: str | None = Field(
        default=None,
        max_length=200,
        description="Hash of the request's content. A stored outcome of another fingerprint "
        "under the same key is not served: the key was reused for a different request.",
    )
    capture: bool = Field(
        default=False,
        description="The config captures this request: its answer is kept too, redacted.",
    )
    experiment: ExperimentTag | None = Field(
        default=None,
        description="The tier's experiment this request is assigned in (None: none runs, or the "
        "request pinned a model). A candidate request tries the candidate first, then the "
        "tier's models.",
    )

    @property
    def request_id(self) -> str:
        return self.request.request_id


class StreamMark(_Message):
    """Which stream carried an answer's chunks, and how many it sent."""

    id: str = Field(min_length=1, max_length=300)
    chunks: int = Field(ge=0)


TokenCount = Annotated[int, Field(ge=0, le=TOKEN_COUNT_MAX)]
# A duration or price: never negative, never NaN or infinite.
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Usage(_Message):
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    total_tokens: int = Field(default=0, ge=0, le=2 * TOKEN_COUNT_MAX)


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
    attempts: int = Field(
        ge=0, le=ATTEMPT_MAX, description="Model calls made for this request, failed ones included."
    )
    latency_ms: float = Field(allow_inf_nan=False)
    completion: dict[str, Any]
    usage: Usage
    cost_usd: NonNegative = 0.0
    stream: StreamMark | None = Field(
        default=None, description="The stream that carried this answer's chunks, if streamed."
    )
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
    param: str | None = Field(
        default=None, max_length=200, description="The request field the error is about, if one."
    )
    retryable: bool = False
    attempts: int = Field(default=0, ge=0, le=ATTEMPT_MAX)
    stream: StreamMark | None = Field(
        default=None, description="The stream whose chunks went out before this error, if any."
    )
    completed_at: datetime = Field(default_factory=utcnow)


Outcome = Annotated[ChatResult | ChatError, Field(discriminator="kind")]


class StreamChunk(_Message):
    """Part of a streamed answer, on the reply topic before its ChatResult or ChatError.

    A worker coalesces the model's deltas for a few milliseconds into one chunk: ``choices``
    are OpenAI ``chat.completion.chunk`` choices (``index``, ``delta``, ``logprobs``,
    ``finish_reason``), at most one per choice index. ``stream`` names one model call's stream
    and ``seq`` counts its chunks from 0, so a reader shows each chunk once, in order, and never
    mixes two streams (a redelivered request is answered by a new one)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["chunk"] = "chunk"
    request_id: str
    stream: str = Field(min_length=1, max_length=300)
    seq: int = Field(ge=0)
    model: str
    choices: list[dict[str, Any]]


Reply = Annotated[ChatResult | ChatError | StreamChunk, Field(discriminator="kind")]


class CancelRequest(_Message):
    """The client of a streamed request left: stop its model call (the cancel topic)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="the client disconnected", max_length=500)
    at: datetime = Field(default_factory=utcnow)


# cut_off: a streamed answer that broke after its first chunk went out; cancelled: the client
# of a stream left, and the model call was stopped
AttemptStatus = Literal["ok", "error", "timeout", "rate_limited", "skipped", "cut_off", "cancelled"]


CascadeStep = Literal["", "draft", "judge", "escalation"]
# AttemptEvent.input_noise: '' or names of lower-case words joined by commas
INPUT_NOISE_FORM = r"^([a-z_]+(,[a-z_]+)*)?$"


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
    attempt: int = Field(
        ge=0, le=ATTEMPT_MAX, description="0-based index of this call within the request."
    )
    status: AttemptStatus
    error_code: str = ""
    tokens_in: TokenCount = 0
    tokens_out: TokenCount = 0
    latency_ms: NonNegative = 0.0
    ttft_ms: NonNegative | None = None
    cost_usd: NonNegative = 0.0
    response_sha256: str = ""
    tenant_hash: str = ""
    worker_config_hash: str = Field(
        default="",
        max_length=100,
        description="The config the worker made the attempt on (config_hash is the router's).",
    )
    experiment: str = Field(default="", max_length=MAX_NAME, description="'' outside experiments.")
    variant: Variant | Literal[""] = ""
    share_pct: float = Field(
        default=0.0, ge=0, le=100, allow_inf_nan=False, description="Candidate share in force."
    )
    route_score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="The semantic stage's best score for the request, when the stage ran.",
    )
    cascade_step: CascadeStep = Field(
        default="", description="In a cascade tier: draft, judge or escalation; '' elsewhere."
    )
    verdict: Literal["", "accepted", "rejected"] = Field(
        default="", description="The verifier's verdict on a draft (its row only)."
    )
    verdict_reason: str = Field(
        default="", max_length=500, description="What the draft failed, or 'passed'."
    )
    retry: int = Field(
        default=0,
        ge=0,
        le=ATTEMPT_MAX,
        description="0 on the first try of this model within the request, then 1, 2, ...",
    )
    input_noise: str = Field(
        default="",
        max_length=100,
        pattern=INPUT_NOISE_FORM,
        description="Why the input counts as noisy, comma-separated (tagged, truncated, garbled, "
        "very_long), or '' for a clean one.",
    )
    context_window: TokenCount = Field(
        default=0, description="The model's maximum input tokens; 0 when unknown."
    )


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
