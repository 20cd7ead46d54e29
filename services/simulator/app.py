"""``create_app(settings)``: the OpenAI-compatible HTTP face of the provider simulator.

litellm and the ``openai`` SDK call it over real HTTP exactly as they would call a provider, so
the worker's retry, fallback, timeout and streaming paths are exercised end to end with no
internet and no keys. Every answer says it is simulated (``system_fingerprint``, ``server``
header, the text itself). Timing, text and fault decisions live in ``profiles.py``, answer
quality in ``quality.py``; this module only turns them into HTTP: JSON bodies, SSE streams, error
bodies and dropped connections.

Every answer says how it was graded: ``x-simulator-class`` (the prompt's class; a request may
set it with the same header) and ``x-simulator-quality`` (``good`` or ``poor``, one per choice,
comma-separated), on streams too, since headers precede the body.

Control endpoints, for tests and people driving a scenario (a canary promoted or rolled back):

- ``POST /simulator/faults`` queues faults, ``DELETE /simulator/faults`` drops them;
- ``GET /simulator/stats``: what was served, per model (answers and poor answers per class of
  prompt included), and the faults still queued;
- ``GET /simulator/profiles``: every model's current latency profile;
- ``PATCH /simulator/profiles/{model}`` merges the body's fields over a model's profile
  (``{"error_rate_500": 0.5}``, ``{"ttft_s": 3.0}``) for the requests that follow; requests
  already in flight keep their plan. ``POST /simulator/profiles/{model}/reset`` restores the
  profile the simulator started with (built-ins and the profiles file).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from types import MappingProxyType
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Message, Receive, Scope, Send

from services.simulator.config import SimulatorSettings
from services.simulator.profiles import (
    CompletionPlan,
    FaultKind,
    FaultPlan,
    LatencyProfile,
    SimulatorStats,
    completion_words,
    last_user_text,
    load_profiles,
    prompt_text,
    prompt_tokens,
    resolve_model,
)
from services.simulator.quality import (
    PromptClass,
    Verdict,
    classify,
    judge,
    poor_length,
    shape_words,
)
from services.simulator.structured import ToolCallAnswer, json_text, poor_json_text, tool_call

log = logging.getLogger("switchboard.simulator")

FINGERPRINT = "switchboard-simulator"
FAULT_HEADER = "x-simulator-fault"
CLASS_HEADER = "x-simulator-class"  # request: overrides the classifier; answer: the class used
QUALITY_HEADER = "x-simulator-quality"  # answer: good or poor, per choice
# Log probabilities of a good answer's tokens, and of a poor one's: any mean-logprob threshold
# in between tells them apart, however short the answer.
GOOD_LOGPROBS = (-0.15, 0.0)
POOR_LOGPROBS = (-2.5, -1.5)
# A "timeout" fault answers after this long: longer than any client timeout in the configs.
HANG_S = 3600.0
# How long a dropped connection may take to be reported closed by the server.
DROP_WAIT_S = 5.0
# Where SimulatorApp puts, for the endpoints, a function that closes the client's connection.
_ABORT_KEY = "switchboard.simulator.abort"

T = TypeVar("T", bound=BaseModel)

router = APIRouter()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields the simulator reads; the rest (temperature, seed, user, metadata,
    reasoning_effort, logit_bias...) is accepted and ignored. ``tools`` and ``response_format``
    shape the answer (``structured.py``); ``n`` answers that many choices; ``logprobs`` and
    ``top_logprobs`` add made-up, deterministic log probabilities per token."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=128)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def token_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "*"
    kind: FaultKind
    count: int = Field(default=1, ge=1, le=1_000_000)


class SimulatorError(Exception):
    """An error answered with OpenAI's error body, so clients map it as they would a provider's."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


@dataclass
class SimulatorState:
    settings: SimulatorSettings
    profiles: dict[str, LatencyProfile]  # current: what the next request of each model gets
    loaded: Mapping[str, LatencyProfile]  # as started (built-ins + file): what a reset restores
    faults: FaultPlan
    stats: SimulatorStats
    jitter: random.Random
    # Set when the server shuts down: requests hanging on a "timeout" fault give up then.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


class SimulatorApp(FastAPI):
    """FastAPI that stamps ``server: switchboard-simulator`` and can drop a connection.

    Dropping needs the server's transport, which only the outermost ASGI layer can reach:
    uvicorn's ``send`` is a method of the request cycle that owns it. Middleware sees wrapped
    ``send`` functions, hence this override rather than a middleware.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope[_ABORT_KEY] = partial(_close_transport, send)

        async def send_stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"server"]
                message = {**message, "headers": [*headers, (b"server", FINGERPRINT.encode())]}
            await send(message)

        await super().__call__(scope, receive, send_stamped)


def _close_transport(send: Send) -> bool:
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        return False
    transport.close()
    return True


def create_app(settings: SimulatorSettings) -> FastAPI:
    """The simulator app with its own profiles, fault plan and statistics."""
    profiles = load_profiles(settings.profiles_file)
    state = SimulatorState(
        settings=settings,
        profiles=dict(profiles),
        loaded=MappingProxyType(profiles),
        faults=FaultPlan(settings.seed),
        stats=SimulatorStats(list(profiles)),
        jitter=random.Random(settings.seed),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.stopping = asyncio.Event()  # bound to the loop that serves
        log.warning(
            "switchboard provider SIMULATOR: synthetic answers, not a model "
            "(simulated models: %s; latency_scale %s)",
            ", ".join(profiles),
            settings.latency_scale,
        )
        yield

    app = SimulatorApp(title="Switchboard provider simulator", lifespan=lifespan)
    app.state.simulator = state
    app.add_exception_handler(SimulatorError, _error_handler)
    app.include_router(router)
    return app


def release_hanging_requests(app: FastAPI) -> None:
    """End requests held by a "timeout" fault, so a shutdown need not wait for them."""
    app.state.simulator.stopping.set()


async def _error_handler(_: Request, exc: Exception) -> Response:
    if not isinstance(exc, SimulatorError):  # registered for SimulatorError only
        raise exc
    return exc.response()


def _state(request: Request) -> SimulatorState:
    state: SimulatorState = request.app.state.simulator
    return state


@router.get("/health")
async def health() -> dict[str, Any]:
    return {"status": "ok", "simulator": True}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    names = _state(request).profiles
    data = [{"id": n, "object": "model", "created": 0, "owned_by": FINGERPRINT} for n in names]
    return {"object": "list", "data": data}


@router.post("/simulator/faults")
async def queue_faults(request: Request) -> dict[str, Any]:
    """Queue ``count`` faults for the next matching requests (``model`` "*" matches all)."""
    state = _state(request)
    body = await _parse(request, FaultRequest)
    model = body.model if body.model == "*" else _known_model(body.model, state)
    state.faults.enqueue(model, body.kind, body.count)
    return {"queued_faults": state.faults.pending()}


@router.delete("/simulator/faults")
async def clear_faults(request: Request) -> dict[str, Any]:
    return {"cleared": _state(request).faults.clear()}


@router.get("/simulator/stats")
async def stats(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {
        "simulator": True,
        "models": state.stats.snapshot(),
        "queued_faults": state.faults.pending(),
    }


@router.get("/simulator/profiles")
async def list_profiles(request: Request) -> dict[str, Any]:
    profiles = _state(request).profiles
    fields = {name: profile.model_dump(mode="json") for name, profile in profiles.items()}
    return {"simulator": True, "profiles": fields}


# ``:path`` because a model name may carry litellm's prefix, slash included ("openai/sim-light").
@router.patch("/simulator/profiles/{name:path}")
async def patch_profile(request: Request, name: str) -> dict[str, Any]:
    """Merge the body's fields over the model's current profile, for the requests that follow."""
    state = _state(request)
    model = _known_model(name, state)
    changes = await _json_object(request)
    try:
        profile = state.profiles[model].updated(changes)
    except ValidationError as exc:
        raise _invalid(exc) from exc
    return _replace_profile(state, model, profile)


@router.post("/simulator/profiles/{name:path}/reset")
async def reset_profile(request: Request, name: str) -> dict[str, Any]:
    """Restore the profile the simulator started with."""
    state = _state(request)
    model = _known_model(name, state)
    return _replace_profile(state, model, state.loaded[model])


def _replace_profile(state: SimulatorState, model: str, profile: LatencyProfile) -> dict[str, Any]:
    # Requests in flight planned from the old profile and keep it; it is frozen, never edited.
    state.profiles[model] = profile
    fields = profile.model_dump(mode="json")
    log.info("simulated model %s now has the profile %s", model, fields)
    return {"model": model, "profile": fields}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """Validate, pick a fault or a plan, then answer as JSON or SSE after the planned delays."""
    state = _state(request)
    body = await _parse(request, ChatCompletionRequest)
    model = _known_model(body.model, state)
    forced = _forced_fault(request)
    prompt_class = _prompt_class(request, body)
    profile = state.profiles[model]
    state.stats.request(model)
    fault = state.faults.next_fault(model, profile, forced)
    if fault is not None:
        state.stats.fault(model, fault)
        if not (fault is FaultKind.DISCONNECT and body.stream):
            return await _serve_fault(request, state, model, fault)
    plan = profile.plan(body.token_cap, state.settings.latency_scale, state.jitter.uniform(-1, 1))
    answer = _Answer.build(model, profile, body, plan, prompt_class)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(request, state, answer, include_usage, fault is FaultKind.DISCONNECT)
        headers = {"cache-control": "no-cache", **answer.headers()}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    if await _pause(request, state, answer.total_s, release_on_stop=False):
        return Response(status_code=499)  # the client left; nobody reads this
    _count_served(state, answer)
    return JSONResponse(answer.completion(), headers=answer.headers())


async def _parse(request: Request, model: type[T]) -> T:
    """Validate a JSON body, answering 400 with the offending field as ``param``."""
    data = await _json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from exc


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        raise SimulatorError(
            400, f"We could not parse the JSON body of your request: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise SimulatorError(400, "The request body must be a JSON object.")
    return data


def _invalid(exc: ValidationError) -> SimulatorError:
    """A 400 naming the first offending field as ``param`` (None for a rule across fields)."""
    error = exc.errors()[0]
    param = ".".join(str(p) for p in error["loc"]) or None
    if error["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    elif error["type"] == "extra_forbidden":
        message = f"Unrecognized parameter: '{param}'."
    elif param is None:
        message = f"Invalid request: {error['msg']}."
    else:
        message = f"Invalid value for '{param}': {error['msg']}."
    return SimulatorError(400, message, param=param)


def _known_model(name: str, state: SimulatorState) -> str:
    model = resolve_model(name, state.profiles)
    if model is None:
        raise SimulatorError(
            404,
            f"The model '{name}' does not exist in the simulator "
            f"(simulated models: {', '.join(state.profiles)}).",
            param="model",
            code="model_not_found",
        )
    return model


E = TypeVar("E", bound=StrEnum)


def _header_choice(request: Request, header: str, choices: type[E]) -> E | None:
    """The member of ``choices`` the header names (None: no header); another value is a 400
    naming the header and what it takes."""
    value = request.headers.get(header)
    if value is None:
        return None
    try:
        return choices(value.strip().lower())
    except ValueError:
        allowed = ", ".join(c.value for c in choices)
        raise SimulatorError(
            400, f"Invalid {header} {value!r}; one of: {allowed}.", param=header
        ) from None


def _forced_fault(request: Request) -> FaultKind | None:
    return _header_choice(request, FAULT_HEADER, FaultKind)


def _prompt_class(request: Request, body: ChatCompletionRequest) -> PromptClass:
    """The class the request's header names, else the classifier's, of the last user message."""
    forced = _header_choice(request, CLASS_HEADER, PromptClass)
    if forced is not None:
        return forced
    return classify(last_user_text([m.model_dump() for m in body.messages]))


def _count_served(state: SimulatorState, answer: _Answer) -> None:
    state.stats.completed(answer.model)
    for choice in answer.choices:
        state.stats.answered(answer.model, answer.prompt_class, choice.poor)


async def _serve_fault(
    request: Request, state: SimulatorState, model: str, fault: FaultKind
) -> Response:
    if fault is FaultKind.RATE_LIMIT:
        raise SimulatorError(
            429,
            f"Simulated rate limit for {model} (fault injection). Retry after 1 second.",
            type_="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"retry-after": "1"},
        )
    if fault is FaultKind.SERVER_ERROR:
        raise SimulatorError(
            500,
            f"Simulated server error for {model} (fault injection).",
            type_="server_error",
            code="internal_server_error",
        )
    if fault is FaultKind.TIMEOUT:
        await _pause(request, state, HANG_S, release_on_stop=True)
    return await _drop_connection(request, state)


async def _drop_connection(request: Request, state: SimulatorState) -> Response:
    """Close the client's connection without (the rest of) a response."""
    abort: Callable[[], bool] | None = request.scope.get(_ABORT_KEY)
    if abort is None or not abort():
        # Not served by uvicorn: no transport to close. Failing the request still ends it
        # without a completion; the server then closes or answers 500 as it sees fit.
        raise ConnectionAbortedError("simulated disconnect")
    await _pause(request, state, DROP_WAIT_S, release_on_stop=False)  # until the server notices
    return Response(status_code=499)  # the connection is gone; the server drops this


async def _pause(
    request: Request, state: SimulatorState, seconds: float, release_on_stop: bool
) -> bool:
    """Sleep ``seconds``; True if cut short because the client left (or the server stops).

    A plain sleep would outlive the client: a 4 s reasoning answer or an hour-long "timeout"
    fault would keep running after the caller gave up and hold the server's shutdown.
    """
    if seconds <= 0:
        return False
    waiters: list[Awaitable[Any]] = [_until_disconnected(request.receive)]
    if release_on_stop:
        waiters.append(state.stopping.wait())
    tasks = [asyncio.ensure_future(w) for w in waiters]
    try:
        done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return bool(done)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class _Choice:
    """One choice of an answer: its words, its text or tool call, and its own plan."""

    words: list[str]
    text: str  # the content: the words, or the JSON that response_format asked for
    call: ToolCallAnswer | None  # a tool call instead of text
    plan: CompletionPlan  # the answer's, or shorter: a poor answer ends sooner
    poor: bool

    def pieces(self) -> list[tuple[int, str, list[str]]]:
        """The streamed fragments of the text or of the call's arguments, each with the token
        count at which it is due and its tokens; joined, they are the whole."""
        bounds = self.plan.chunk_bounds()
        if self.call is None and self.text == " ".join(self.words):
            tokens = [w if i == 0 else " " + w for i, w in enumerate(self.words)]
            return [(end, "".join(tokens[first:end]), tokens[first:end]) for first, end in bounds]
        whole = self.call.arguments if self.call else self.text
        if not bounds:
            return [(0, whole, [whole])]
        size = -(-len(whole) // len(bounds))  # ceiling: every character in some piece
        cut = [whole[i * size : (i + 1) * size] for i in range(len(bounds))]
        return [(end, piece, [piece]) for (_, end), piece in zip(bounds, cut, strict=True)]


def _choice(
    model: str,
    body: ChatCompletionRequest,
    messages: list[dict[str, Any]],
    verdict: Verdict,
    variant: int,
    plan: CompletionPlan,
    poor_tokens: int,
) -> _Choice:
    """One choice: a tool call as ever, else text or JSON, good or poor as ``verdict`` says."""
    words = completion_words(model, messages, plan.completion_tokens, variant)
    call = _structured("tools", tool_call, body.tools, body.tool_choice, messages, words)
    if call is not None:  # tool calls are not graded: they are answered as they always were
        return _Choice(words, "", call, plan, poor=False)
    text: str | None  # None: plain text, not JSON
    if verdict.poor:
        plan = plan.shortened(poor_tokens)
        words = words[: plan.completion_tokens]  # the same words a shorter plan would give
        text = _structured(
            "response_format", poor_json_text, body.response_format, words, verdict.opener
        )
    else:
        json_words = shape_words(words, verdict, final_line=False)
        text = _structured("response_format", json_text, body.response_format, json_words)
    words = shape_words(words, verdict, final_line=text is None and plan.finish_reason == "stop")
    return _Choice(words, " ".join(words) if text is None else text, None, plan, verdict.poor)


def _logprob_entries(tokens: list[str], top: int, poor: bool) -> list[dict[str, Any]]:
    """Made-up log probabilities, the same for the same tokens, in OpenAI's shape: confident
    for a good answer; low, and the alternatives close behind, for a poor one."""
    low, high = POOR_LOGPROBS if poor else GOOD_LOGPROBS
    gap = 0.25 if poor else 1.0  # between the chosen token and each next alternative
    out = []
    for token in tokens:
        digest = hashlib.sha256(token.encode()).digest()
        best = high - digest[0] / 255 * (high - low)
        alternatives = [
            {
                "token": f"{token.strip()}~{k}",
                "logprob": best - gap * (1 + k + digest[k + 1] / 255),
                "bytes": list(f"{token.strip()}~{k}".encode()),
            }
            for k in range(max(top - 1, 0))
        ]
        head = {"token": token, "logprob": best, "bytes": list(token.encode())}
        out.append({**head, "top_logprobs": [head, *alternatives][:top]})
    return out


@dataclass(frozen=True)
class _Answer:
    """One simulated answer: its plan, choices and usage, in OpenAI's shapes."""

    id: str
    created: int
    model: str
    plan: CompletionPlan  # the longest a choice may be; its pacing is every choice's
    prompt_class: PromptClass
    choices: list[_Choice]
    usage: dict[str, int]
    logprobs: int | None  # top_logprobs when the request asked for logprobs

    @classmethod
    def build(
        cls,
        model: str,
        profile: LatencyProfile,
        body: ChatCompletionRequest,
        plan: CompletionPlan,
        prompt_class: PromptClass,
    ) -> _Answer:
        messages = [m.model_dump() for m in body.messages]
        prompt = prompt_text(messages)
        poor_tokens = poor_length(profile.output_tokens)
        choices = []
        for variant in range(body.n):
            verdict = judge(model, prompt, variant, prompt_class, profile.quality)
            choices.append(_choice(model, body, messages, verdict, variant, plan, poor_tokens))
        prompt_count = prompt_tokens(messages)
        completion = sum(choice.plan.completion_tokens for choice in choices)
        usage = {
            "prompt_tokens": prompt_count,
            "completion_tokens": completion,
            "total_tokens": prompt_count + completion,
        }
        answer_id = f"chatcmpl-sim-{uuid.uuid4().hex[:24]}"
        top = (body.top_logprobs or 0) if body.logprobs else None
        return cls(answer_id, int(time.time()), model, plan, prompt_class, choices, usage, top)

    @property
    def total_s(self) -> float:
        """When the last choice is complete."""
        return max(choice.plan.total_s for choice in self.choices)

    def headers(self) -> dict[str, str]:
        grades = ", ".join("poor" if choice.poor else "good" for choice in self.choices)
        return {CLASS_HEADER: self.prompt_class.value, QUALITY_HEADER: grades}

    def finish_reason(self, choice: _Choice) -> str:
        return "tool_calls" if choice.call else choice.plan.finish_reason

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
        }

    def _logprobs(self, tokens: list[str], poor: bool) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        return {"content": _logprob_entries(tokens, self.logprobs, poor), "refusal": None}

    def completion(self) -> dict[str, Any]:
        out = []
        for index, choice in enumerate(self.choices):
            message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
            if choice.call is not None:
                message.update(content=None, tool_calls=[choice.call.as_message_call()])
            tokens = [t for _, _, ts in choice.pieces() for t in ts]
            logprobs = self._logprobs(tokens, choice.poor) if choice.call is None else None
            out.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": self.finish_reason(choice),
                }
            )
        return {**self._envelope("chat.completion"), "choices": out, "usage": self.usage}

    def chunk(
        self,
        delta: dict[str, Any],
        finish: str | None,
        with_usage: bool,
        index: int = 0,
        tokens: list[str] | None = None,
        poor: bool = False,
    ) -> bytes:
        logprobs = self._logprobs(tokens, poor) if tokens is not None else None
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        body = {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        if with_usage:
            body["usage"] = None  # as OpenAI does: usage comes alone in the last chunk
        return _sse(body)

    def usage_chunk(self) -> bytes:
        return _sse({**self._envelope("chat.completion.chunk"), "choices": [], "usage": self.usage})


def _structured(param: str, build: Callable[..., Any], *args: Any) -> Any:
    """A tool call or JSON answer built from the request's schemas; a schema the builder cannot
    follow is the client's error, as a provider answers a schema it cannot use."""
    try:
        return build(*args)
    except Exception as exc:  # any malformed schema: types, $refs, bounds of the wrong kind
        raise SimulatorError(
            400, f"Invalid schema in '{param}': {type(exc).__name__}: {exc}", param=param
        ) from exc


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _stream(
    request: Request, state: SimulatorState, answer: _Answer, include_usage: bool, drop: bool
) -> AsyncIterator[bytes]:
    """SSE: role chunks after the TTFT, content paced at tokens_per_s (the choices of ``n`` > 1
    interleaved, as OpenAI sends them), finish, usage, [DONE]. A ``disconnect`` fault closes the
    connection right after the first content chunk: the client has a token, then nothing.

    Starlette cancels this generator when the client disconnects, so plain sleeps are safe.
    """
    plan = answer.plan
    await asyncio.sleep(plan.ttft_s)
    for index in range(len(answer.choices)):
        yield answer.chunk({"role": "assistant", "content": ""}, None, include_usage, index)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index, choice in enumerate(answer.choices):
        if choice.call is not None:
            head = {"index": 0, "id": choice.call.id, "type": "function"}
            opening = {**head, "function": {"name": choice.call.name, "arguments": ""}}
            yield answer.chunk({"tool_calls": [opening]}, None, include_usage, index)
    pieces = [choice.pieces() for choice in answer.choices]
    for step in range(max(len(p) for p in pieces)):
        # the choices still going share the pacing (a poor choice just ends sooner)
        end = max(p[step][0] for p in pieces if step < len(p))
        delay = start + end * plan.token_interval_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        for index, choice in enumerate(answer.choices):
            if step >= len(pieces[index]):
                continue
            _, piece, tokens = pieces[index][step]
            delta: dict[str, Any]
            if choice.call is not None:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                yield answer.chunk(delta, None, include_usage, index)
            else:
                yield answer.chunk(
                    {"content": piece}, None, include_usage, index, tokens, choice.poor
                )
        if drop:
            break
    if drop:
        await _drop_connection(request, state)
        return
    for index, choice in enumerate(answer.choices):
        yield answer.chunk({}, answer.finish_reason(choice), include_usage, index)
    if include_usage:
        yield answer.usage_chunk()
    yield b"data: [DONE]\n\n"
    _count_served(state, answer)
