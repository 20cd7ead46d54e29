"""``create_app(settings)``: the OpenAI-compatible HTTP face of the provider simulator.

litellm and the ``openai`` SDK call it over real HTTP exactly as they would call a provider, so
the worker's retry, fallback, timeout and streaming paths are exercised end to end with no
internet and no keys. Every answer says it is simulated (``system_fingerprint``, ``server``
header, the text itself). Timing, text and fault decisions live in ``profiles.py``; this module
only turns them into HTTP: JSON bodies, SSE streams, error bodies and dropped connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
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
    load_profiles,
    prompt_tokens,
    resolve_model,
)
from services.simulator.structured import ToolCallAnswer, json_text, tool_call

log = logging.getLogger("switchboard.simulator")

FINGERPRINT = "switchboard-simulator"
FAULT_HEADER = "x-simulator-fault"
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
    """The fields the simulator reads; the rest (temperature, seed...) is accepted and ignored.
    ``tools`` and ``response_format`` shape the answer (``structured.py``)."""

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
    profiles: dict[str, LatencyProfile]
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
        profiles=profiles,
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


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """Validate, pick a fault or a plan, then answer as JSON or SSE after the planned delays."""
    state = _state(request)
    body = await _parse(request, ChatCompletionRequest)
    model = _known_model(body.model, state)
    forced = _forced_fault(request)
    profile = state.profiles[model]
    state.stats.request(model)
    fault = state.faults.next_fault(model, profile, forced)
    if fault is not None:
        state.stats.fault(model, fault)
        if not (fault is FaultKind.DISCONNECT and body.stream):
            return await _serve_fault(request, state, model, fault)
    plan = profile.plan(body.token_cap, state.settings.latency_scale, state.jitter.uniform(-1, 1))
    answer = _Answer.build(model, body, plan)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(request, state, answer, include_usage, fault is FaultKind.DISCONNECT)
        headers = {"cache-control": "no-cache"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    if await _pause(request, state, plan.total_s, release_on_stop=False):
        return Response(status_code=499)  # the client left; nobody reads this
    state.stats.completed(model)
    return JSONResponse(answer.completion())


async def _parse(request: Request, model: type[T]) -> T:
    """Validate a JSON body, answering 400 with the offending field as ``param``."""
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        raise SimulatorError(
            400, f"We could not parse the JSON body of your request: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise SimulatorError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        if error["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {error['msg']}."
        raise SimulatorError(400, message, param=param) from exc


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


def _forced_fault(request: Request) -> FaultKind | None:
    value = request.headers.get(FAULT_HEADER)
    if value is None:
        return None
    try:
        return FaultKind(value.strip().lower())
    except ValueError:
        allowed = ", ".join(k.value for k in FaultKind)
        raise SimulatorError(
            400, f"Invalid {FAULT_HEADER} {value!r}; one of: {allowed}.", param=FAULT_HEADER
        ) from None


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
class _Answer:
    """One simulated answer: its plan, words and usage, in OpenAI's shapes."""

    id: str
    created: int
    model: str
    plan: CompletionPlan
    words: list[str]
    usage: dict[str, int]
    text: str  # the content: the words, or the JSON that response_format asked for
    call: ToolCallAnswer | None  # a tool call instead of text

    @classmethod
    def build(cls, model: str, body: ChatCompletionRequest, plan: CompletionPlan) -> _Answer:
        messages = [m.model_dump() for m in body.messages]
        words = completion_words(model, messages, plan.completion_tokens)
        prompt = prompt_tokens(messages)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": plan.completion_tokens,
            "total_tokens": prompt + plan.completion_tokens,
        }
        answer_id = f"chatcmpl-sim-{uuid.uuid4().hex[:24]}"
        call = _structured("tools", tool_call, body.tools, body.tool_choice, messages, words)
        json_answer = (
            None if call else _structured("response_format", json_text, body.response_format, words)
        )
        text = json_answer or ("" if call else " ".join(words))
        return cls(answer_id, int(time.time()), model, plan, words, usage, text, call)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.call else self.plan.finish_reason

    def pieces(self) -> list[tuple[int, str]]:
        """The streamed fragments of the text or of the call's arguments, each with the token
        count at which it is due; joined, they are the whole."""
        bounds = self.plan.chunk_bounds()
        if self.call is None and self.text == " ".join(self.words):
            return [
                (end, ("" if not first else " ") + " ".join(self.words[first:end]))
                for first, end in bounds
            ]
        whole = self.call.arguments if self.call else self.text
        if not bounds:
            return [(0, whole)]
        size = -(-len(whole) // len(bounds))  # ceiling: every character in some piece
        return [(end, whole[i * size : (i + 1) * size]) for i, (_, end) in enumerate(bounds)]

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
        }

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text, "refusal": None}
        if self.call is not None:
            message.update(content=None, tool_calls=[self.call.as_message_call()])
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": self.finish_reason,
        }
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": self.usage}

    def chunk(self, delta: dict[str, Any], finish: str | None, with_usage: bool) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
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
    """SSE: role chunk after the TTFT, content paced at tokens_per_s, finish, usage, [DONE].

    Starlette cancels this generator when the client disconnects, so plain sleeps are safe.
    """
    plan = answer.plan
    await asyncio.sleep(plan.ttft_s)
    yield answer.chunk({"role": "assistant", "content": ""}, None, include_usage)
    if drop:
        await _drop_connection(request, state)
        return
    loop = asyncio.get_running_loop()
    start = loop.time()
    call = answer.call
    if call is not None:
        head = {"index": 0, "id": call.id, "type": "function"}
        opening = {**head, "function": {"name": call.name, "arguments": ""}}
        yield answer.chunk({"tool_calls": [opening]}, None, include_usage)
    for end, piece in answer.pieces():
        delay = start + end * plan.token_interval_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        delta: dict[str, Any]
        if call is not None:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
        else:
            delta = {"content": piece}
        yield answer.chunk(delta, None, include_usage)
    yield answer.chunk({}, answer.finish_reason, include_usage)
    if include_usage:
        yield answer.usage_chunk()
    yield b"data: [DONE]\n\n"
    state.stats.completed(answer.model)
