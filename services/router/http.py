"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions``, ``GET /v1/models``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.v1 import (
    AUTO_MODEL,
    UNSUPPORTED_PARAMETERS,
    ChatError,
    ChatParameters,
    ChatRequest,
    ChatResult,
    Outcome,
    RoutedRequest,
    StreamChunk,
    asks_for_unsupported,
    check_logprobs,
    check_stream_options,
    check_tool_choice,
    new_request_id,
)
from services.common import capabilities
from services.common.capabilities import MissingCapability
from services.common.kafka import RecordTooLarge
from services.common.routing_config import LoadedConfig
from services.common.runtime import metrics
from services.router.domain.classify import UnknownModel
from services.router.domain.images import BadImage
from services.router.errors import ApiError, from_outcome, invalid, key_reused, param_path
from services.router.replies import ReplyTopics
from services.router.request_metrics import Note, RequestMetrics, note_of
from services.router.service import (
    KeyReused,
    PendingReplies,
    Router,
    fingerprint,
    idempotent_request_id,
)
from services.router.streaming import (
    DONE,
    RelayResponse,
    StreamRelay,
    error_event,
    until_disconnect,
)

log = logging.getLogger(__name__)

# How long a request may wait for the broker to take it (a broker that is up takes it in ms).
PUBLISH_TIMEOUT_S = 10.0
RETRY_AFTER_S = 1  # what an overloaded router tells callers to wait


class ChatCompletionBody(ChatParameters):
    """OpenAI's chat completion request as Switchboard carries it out. Other OpenAI parameters
    are refused by name unless they ask for nothing (``UNSUPPORTED_PARAMETERS``), and so is any
    field OpenAI does not define, as OpenAI's API does."""

    model: str = Field(
        min_length=1,
        max_length=200,
        description=f"`{AUTO_MODEL}` to classify, a tier name to force it, or a configured "
        "model's name or alias to pin it (GET /v1/models).",
    )


class HttpContext:
    def __init__(
        self,
        router: Router,
        replies: PendingReplies,
        reply_topics: ReplyTopics,
        api_key: str | None,
        reply_grace_s: float,
        max_waiting: int = 5000,
    ) -> None:
        self.router, self.replies, self.reply_topics = router, replies, reply_topics
        self.api_key, self.reply_grace_s = api_key, reply_grace_s
        self.max_waiting = max_waiting
        self.broker_ready: Callable[[], bool] = lambda: True  # the broker watch's verdict
        self.not_ready: Callable[[], str | None] = lambda: None  # why to send no traffic


def _check_key(ctx: HttpContext, request: Request) -> None:
    if ctx.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "missing bearer key: send 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="missing_api_key",
        )
    if not secrets.compare_digest(token.encode(), ctx.api_key.encode()):
        raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key")


def _refuse_extras(body: ChatCompletionBody) -> None:
    for name, value in (body.model_extra or {}).items():
        if name not in UNSUPPORTED_PARAMETERS:
            raise invalid(
                f"unrecognized request argument supplied: '{name}'", name, "unknown_parameter"
            )
        if asks_for_unsupported(name, value):
            raise invalid(
                f"'{name}' is not supported by Switchboard yet; omit it or send "
                f"{_plain(UNSUPPORTED_PARAMETERS[name][-1])}",
                name,
                "unsupported_parameter",
            )


def _plain(value: Any) -> str:
    return "null" if value is None else json.dumps(value)


def to_chat_request(body: ChatCompletionBody, idempotency_header: str | None) -> ChatRequest:
    _refuse_extras(body)
    for check, param in (
        (lambda: check_tool_choice(body.tools, body.tool_choice), "tool_choice"),
        (lambda: check_logprobs(body.logprobs, body.top_logprobs), "top_logprobs"),
        (lambda: check_stream_options(body.stream, body.stream_options), "stream_options"),
    ):
        try:
            check()
        except ValueError as exc:
            raise invalid(str(exc), param, "invalid_value") from None
    meta = body.metadata
    key = idempotency_header or meta.idempotency_key
    fields = {name: getattr(body, name) for name in _CARRIED}
    if key:
        fields["request_id"] = idempotent_request_id(meta.tenant, key)
        meta = meta.model_copy(update={"idempotency_key": key})
    return ChatRequest(**fields, metadata=meta)


# what the body hands on as it is (metadata may gain the Idempotency-Key)
_CARRIED = (*(name for name in ChatParameters.model_fields if name != "metadata"), "model")


def _headers(result: ChatResult) -> dict[str, str]:
    return {
        "x-switchboard-request-id": result.request_id,
        "x-switchboard-tier": result.tier,
        "x-switchboard-model": result.model,
        "x-switchboard-rule": result.rule,
        "x-switchboard-config-hash": result.config_hash,
        "x-switchboard-attempts": str(result.attempts),
    }


async def _publish(ctx: HttpContext, routed: RoutedRequest) -> None:
    """Hand the request to its tier topic; a broker that cannot take it within
    ``PUBLISH_TIMEOUT_S``, or that the broker watch says is away, is a 503, not a caller left
    waiting."""
    if not ctx.broker_ready():
        raise ApiError(
            503,
            "Kafka is unreachable or coming back from a restart; the request was not sent. "
            "Send it again shortly (with an Idempotency-Key it is answered once).",
            type="service_unavailable",
            code="broker_unavailable",
        )
    try:
        await asyncio.wait_for(ctx.router.publish(routed), PUBLISH_TIMEOUT_S)
    except RecordTooLarge as exc:
        raise ApiError(
            413,
            f"the request, routed, is {exc.size:,} bytes: over the {exc.limit:,}-byte Kafka "
            "record limit (SWITCHBOARD_MAX_MESSAGE_BYTES). Send images by URL or smaller.",
            type="invalid_request_error",
            code="request_too_large",
            param="messages",
        ) from exc
    except MessageSizeTooLargeError as exc:
        raise ApiError(
            413,
            "Kafka refused the request as too large: its brokers' message.max.bytes is below "
            "SWITCHBOARD_MAX_MESSAGE_BYTES (README 'Production'). Send images by URL or smaller.",
            type="invalid_request_error",
            code="request_too_large",
            param="messages",
        ) from exc
    except (TimeoutError, KafkaError) as exc:
        raise ApiError(
            503,
            f"Kafka did not take the request within {PUBLISH_TIMEOUT_S:g} s; it may still be "
            "answered. Send it again with the same Idempotency-Key: it is answered once.",
            type="service_unavailable",
            code="broker_unavailable",
        ) from exc


def _admit(ctx: HttpContext) -> None:
    """Refuse a caller past ``max_waiting``: a queue that only grows answers nobody in time."""
    if len(ctx.replies) >= ctx.max_waiting:
        raise ApiError(
            503,
            f"{ctx.max_waiting} requests are waiting for answers here already; send it again "
            "after Retry-After seconds (with an Idempotency-Key it is answered once)",
            type="service_unavailable",
            code="overloaded",
            headers={"retry-after": str(RETRY_AFTER_S)},
        )


async def _route(
    ctx: HttpContext, chat: ChatRequest, reply_to: str, content: str | None
) -> RoutedRequest:
    _admit(ctx)
    try:
        decided = await ctx.router.decide(chat)
        return ctx.router.route(chat, reply_to, content_hash=content, decided=decided)
    except UnknownModel as exc:
        raise invalid(str(exc), "model", "model_not_found") from exc
    except BadImage as exc:
        raise invalid(f"'{exc.param}': {exc.message}", exc.param, exc.code) from exc
    except MissingCapability as exc:
        raise invalid(str(exc), exc.param, "unsupported_capability") from exc


def _expect(ctx: HttpContext, chat: ChatRequest, content: str | None) -> tuple[Any, bool]:
    try:
        return ctx.replies.expect(chat.request_id, content)
    except KeyReused as exc:
        raise key_reused() from exc


def _wait_s(ctx: HttpContext, routed: RoutedRequest) -> float:
    """How long a caller waits for the answer: the request's deadline, and a grace for the
    answer's way back."""
    budget = (routed.deadline_at - routed.routed_at).total_seconds() if routed.deadline_at else 600
    return budget + ctx.reply_grace_s


def _deadline_passed(routed: RoutedRequest) -> ApiError:
    return ApiError(
        504,
        f"no answer from tier {routed.tier!r} within the deadline; send it again with the "
        "same Idempotency-Key: an answer that came since is served, else it is tried afresh",
        type="timeout_error",
        code="deadline_exceeded",
    )


async def _answer(ctx: HttpContext, chat: ChatRequest, reply_to: str, note: Note) -> JSONResponse:
    content = fingerprint(chat) if chat.metadata.idempotency_key else None
    routed = await _route(ctx, chat, reply_to, content)
    note.tier = routed.tier
    future, first = _expect(ctx, chat, content)
    try:
        if first:
            await _publish_for_all(ctx, routed, future)
        outcome = await asyncio.wait_for(asyncio.shield(future), _wait_s(ctx, routed))
    except TimeoutError as exc:
        raise _deadline_passed(routed) from exc
    finally:
        ctx.replies.leave(chat.request_id, future)
    if not isinstance(outcome, ChatResult):
        raise from_outcome(outcome)
    completion = {**outcome.completion, "id": outcome.request_id}
    return JSONResponse(completion, headers=_headers(outcome))


async def _stream(
    ctx: HttpContext,
    chat: ChatRequest,
    reply_to: str,
    release: Callable[[], None],
    receive: Callable[[], Awaitable[Any]],
    note: Note,
) -> Response:
    """``stream=true``: publish, wait for the first chunk (an error before it is an ordinary
    HTTP error, with its status), then answer with the events (services/router/streaming.py).
    From then on the response owns the wait: it leaves it, and ``release``s the reply topic,
    when it ends."""
    content = fingerprint(chat) if chat.metadata.idempotency_key else None
    try:
        routed = await _route(ctx, chat, reply_to, content)
        note.tier = routed.tier
        future, first = _expect(ctx, chat, content)
    except BaseException:
        release()
        raise
    queue: asyncio.Queue[StreamChunk] = asyncio.Queue()
    if first:
        ctx.replies.follow(chat.request_id, queue)
    # else a caller with the same Idempotency-Key is being answered: this one joined after its
    # first chunks went by, so it gets the answer whole, as one chunk, when it is done
    options = chat.stream_options
    relay = StreamRelay(
        chat.request_id,
        int(routed.routed_at.timestamp()),
        include_usage=bool(options and options.include_usage),
    )
    deadline = asyncio.get_running_loop().time() + _wait_s(ctx, routed)
    handed = False

    def close() -> None:
        ctx.replies.unfollow(chat.request_id, queue)
        ctx.replies.leave(chat.request_id, future)
        release()

    try:
        if first:
            await _publish_for_all(ctx, routed, future)
        gone = asyncio.ensure_future(until_disconnect(receive))
        try:
            opening, ended = await _opening(relay, queue, future, deadline, routed, gone)
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        if opening is None:  # the client left before the first chunk
            if ctx.replies.callers(chat.request_id) <= 1 and not future.done():
                await _cancel(ctx, chat.request_id)
            return Response(status_code=499)  # nobody reads it
        if ended and opening[-1] != DONE:  # whole, and still not an answer (a broken stream's)
            note.status = "error"
        headers = {
            "x-switchboard-request-id": chat.request_id,
            "x-switchboard-tier": routed.tier,
            "x-switchboard-model": relay.model or "",
            "x-switchboard-rule": routed.rule,
            "x-switchboard-config-hash": routed.config_hash,
        }
        events = _events(relay, opening, ended, queue, future, deadline, routed, note)

        async def left() -> None:
            note.status = "cancelled"
            # the last caller of the request left before its end: stop the model call
            if ctx.replies.callers(chat.request_id) <= 1 and not future.done():
                await _cancel(ctx, chat.request_id)

        response = RelayResponse(events, headers, on_close=close, on_disconnect=left)
        handed = True
        return response
    finally:
        if not handed:
            close()


async def _cancel(ctx: HttpContext, request_id: str) -> None:
    """Best effort: a cancel that cannot be published costs a model call nobody reads."""
    try:
        await asyncio.wait_for(ctx.router.cancel(request_id), PUBLISH_TIMEOUT_S)
    except (TimeoutError, KafkaError) as exc:
        log.warning(
            "request %s: the client left; the cancel was not published: %r", request_id, exc
        )
    else:
        log.info("request %s: the client left mid-stream; cancel published", request_id)


async def _opening(
    relay: StreamRelay,
    queue: asyncio.Queue[StreamChunk],
    future: asyncio.Future[Outcome],
    deadline: float,
    routed: RoutedRequest,
    gone: asyncio.Future[None],
) -> tuple[list[bytes] | None, bool]:
    """The first events, and whether they end the stream; None if the client left first. An
    error before any chunk is raised: the caller answers it as an ordinary HTTP error."""
    while True:
        item = await _next_reply(queue, future, deadline, gone)
        if gone.done():
            return None, False
        if item is None:
            raise _deadline_passed(routed)
        if isinstance(item, StreamChunk):
            opening = relay.take(item)
            if opening:
                return opening, False
        elif isinstance(item, ChatError):
            raise from_outcome(item)
        else:
            return relay.finish(item), True


async def _next_reply(
    queue: asyncio.Queue[StreamChunk],
    future: asyncio.Future[Outcome],
    deadline: float,
    gone: asyncio.Future[None] | None = None,
) -> StreamChunk | Outcome | None:
    """The next chunk, else the outcome once every chunk before it is taken; None at the
    deadline. Chunks and outcome arrive in the order the worker sent them (one partition), and
    the reply handler queues a chunk before it resolves the outcome that follows it."""
    if not queue.empty():
        return queue.get_nowait()
    if future.done():
        return future.result()
    loop = asyncio.get_running_loop()
    getter: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
    waits: set[asyncio.Future[Any]] = {getter, future} if gone is None else {getter, future, gone}
    try:
        await asyncio.wait(
            waits,
            timeout=max(deadline - loop.time(), 0),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    if future.done():
        return future.result()
    return None


async def _events(
    relay: StreamRelay,
    opening: list[bytes],
    ended: bool,
    queue: asyncio.Queue[StreamChunk],
    future: asyncio.Future[Outcome],
    deadline: float,
    routed: RoutedRequest,
    note: Note,
) -> AsyncIterator[bytes]:
    """The events after the opening ones; a stream that ends without ``[DONE]`` (an error
    event) sets the request's ``note.status``."""
    for event in opening:
        yield event
    while not ended:
        try:
            item = await _next_reply(queue, future, deadline)
        except ApiError as exc:  # the wait was failed for every caller (the broker went away)
            note.status = "unavailable" if exc.status == 503 else "error"
            yield error_event(exc)
            return
        if item is None:
            note.status = "timeout"
            yield error_event(_deadline_passed(routed))
            return
        if isinstance(item, StreamChunk):
            for event in relay.take(item):
                yield event
            continue
        last = relay.finish(item)
        if not last or last[-1] != DONE:
            deadline_passed = isinstance(item, ChatError) and item.code == "deadline_exceeded"
            note.status = "timeout" if deadline_passed else "error"
        for event in last:
            yield event
        ended = True


async def _publish_for_all(
    ctx: HttpContext, routed: RoutedRequest, future: asyncio.Future[Outcome]
) -> None:
    """Publish as the first caller of a request id; if that fails, or this caller leaves before
    it is done, callers who joined with the same key are told rather than left waiting."""
    try:
        await _publish(ctx, routed)
    except ApiError as exc:
        ctx.replies.fail(routed.request_id, future, exc)
        raise
    except BaseException:
        left = ApiError(
            503,
            "the first caller with this Idempotency-Key left before its request was sent; "
            "send it again",
            type="service_unavailable",
            code="broker_unavailable",
        )
        ctx.replies.fail(routed.request_id, future, left)
        raise


def model_list(config: LoadedConfig) -> list[dict[str, Any]]:
    """What a request's ``model`` may be: ``switchboard/auto``, each tier (what at least one of
    its models can do), each configured model (the tier a request naming it goes through, its
    other names, what it can do)."""
    spec = config.spec
    data: list[dict[str, Any]] = [
        {
            "id": AUTO_MODEL,
            "object": "model",
            "owned_by": "switchboard",
            "description": "classified by the routing rules",
            "tier": None,
        }
    ]
    for name, tier in spec.tiers.items():
        abilities = [capabilities.of(m) for m in tier.models]
        windows = [a.context_window for a in abilities if a.context_window is not None]
        data.append(
            {
                "id": name,
                "object": "model",
                "owned_by": "switchboard",
                "description": tier.description,
                "tier": name,
                "models": [m.label for m in tier.models],
                "capabilities": {
                    "tools": any(a.tools for a in abilities),
                    "json_schema": any(a.json_schema for a in abilities),
                    "vision": any(a.vision for a in abilities),
                    "context_window": max(windows) if windows else None,
                },
            }
        )
    shown: set[str] = set()
    for pin in config.pins.values():
        if pin.label in shown:
            continue
        shown.add(pin.label)
        model = next(m for m in spec.tiers[pin.tier].models if m.label == pin.label)
        able = capabilities.of(model)
        data.append(
            {
                "id": pin.label,
                "object": "model",
                "owned_by": model.provider,
                "description": f"pins {model.model} (through tier {pin.tier})",
                "tier": pin.tier,
                "tiers": [
                    t
                    for t, ts in spec.tiers.items()
                    if any(m.label == pin.label for m in ts.models)
                ],
                "aliases": sorted(
                    {n for n, p in config.pins.items() if p.label == pin.label} - {pin.label}
                ),
                "pinned_fallback": model.pinned_fallback,
                "capabilities": {
                    "tools": able.tools,
                    "json_schema": able.json_schema,
                    "vision": able.vision,
                    "context_window": able.context_window,
                },
            }
        )
    return data


def key_dependency(ctx: HttpContext) -> Callable[[Request], Awaitable[None]]:
    async def require_key(request: Request) -> None:
        # A dependency, so it runs before the body is validated: a caller without the key
        # learns nothing about what a valid request looks like.
        _check_key(ctx, request)

    return require_key


def api(ctx: HttpContext) -> APIRouter:
    routes = APIRouter()
    require_key = key_dependency(ctx)

    @routes.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        chat = to_chat_request(body, request.headers.get("idempotency-key"))
        request.state.request_id = chat.request_id  # for the 500 of an unexpected error
        note = note_of(request)  # what RequestMetrics counts the request as
        # the reply topic (generation) is kept while this caller waits on it: for a stream,
        # until its response ends
        reply_to = ctx.reply_topics.take()
        handed = False
        try:
            if chat.stream:
                handed = True  # _stream releases it: at once, or when its response ends
                return await _stream(
                    ctx,
                    chat,
                    reply_to,
                    lambda: ctx.reply_topics.release(reply_to),
                    request.receive,
                    note,
                )
            return await _answer(ctx, chat, reply_to, note)
        finally:
            if not handed:
                ctx.reply_topics.release(reply_to)

    @routes.get("/v1/models", dependencies=[Depends(require_key)])
    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": model_list(ctx.router.config)})

    @routes.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "config_hash": ctx.router.config.hash})

    @routes.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 503 with the reason while Kafka is away or answers stopped coming."""
        reason = ctx.not_ready()
        if reason:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    # no key, like /health: counts and timings only (docs/metrics.md)
    routes.add_route("/metrics", metrics, include_in_schema=False)
    return routes


# Framework errors (unknown path, wrong method, a body that cannot be read) in OpenAI's shape.
_HTTP_CODES = {
    400: "invalid_body",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.upstream:
            note_of(request).upstream = True
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.__cause__ is not None:  # e.g. the body is not UTF-8: say what was wrong
            message = f"{message}: {type(exc.__cause__).__name__}: {exc.__cause__}"[:500]
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        err = ApiError(exc.status_code, message, type=kind, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = param_path(tuple(first["loc"])) or None
        if first.get("type") == "json_invalid":
            err = invalid(f"the body is not valid JSON: {first['msg']}", None, "invalid_json")
        elif first.get("type") == "missing":
            err = invalid(f"'{param}' is required", param, "missing_required_parameter")
        else:
            err = invalid(f"'{param}': {first['msg']}", param)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(ValidationError)
    async def model_error(request: Request, exc: ValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = param_path(tuple(first["loc"])) or None
        return JSONResponse(invalid(f"'{param}': {first['msg']}", param).body(), status_code=400)

    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(RequestMetrics)  # outermost: it sees every answer, the 413s and 500s too


class UnexpectedErrors:
    """An error no handler expected: logged once with its traceback, answered with an
    OpenAI-shaped 500 that carries the request id (the caller's reference in a report)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            request_id = scope.get("state", {}).get("request_id") or new_request_id()
            log.exception("request %s: unexpected error", request_id)
            if started:
                raise
            err = ApiError(
                500,
                f"internal error; quote request id {request_id} when reporting it",
                type="server_error",
                code="internal_error",
            )
            response = JSONResponse(
                err.body(), status_code=500, headers={"x-switchboard-request-id": request_id}
            )
            await response(scope, receive, send)


class BodyLimit:
    """Refuses a request body over the limit with an OpenAI-shaped 413: at once when its declared
    length is over, and as soon as the bytes received pass it when there is no declared length
    (a chunked upload), without reading the rest.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs
    every request through an extra task and memory stream, a cost paid by every call.
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    def _refuse(self) -> JSONResponse:
        err = ApiError(
            413,
            f"request body over {self.max_body_bytes} bytes",
            type="invalid_request_error",
            code="request_too_large",
        )
        return JSONResponse(err.body(), status_code=413)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > self.max_body_bytes:
                    await self._refuse()(scope, receive, send)
                    return
                break
        received = 0
        over = False
        started = False

        async def counted() -> Any:
            # past the limit the app is told the client went away: it stops reading, and
            # whatever it answers to the cut body is dropped for the 413 below
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: Any) -> None:
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, tracked)
        if over and not started:
            await self._refuse()(scope, receive, send)
