"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions``, ``GET /v1/models``."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.v1 import (
    AUTO_MODEL,
    ChatMessage,
    ChatRequest,
    ChatResult,
    RequestMetadata,
    RoutedRequest,
)
from services.router.domain.classify import UnknownModel
from services.router.domain.images import BadImage
from services.router.errors import ApiError, from_outcome, invalid, param_path
from services.router.replies import ReplyTopics
from services.router.service import PendingReplies, Router, idempotent_request_id

# How long a request may wait for the broker to take it (a broker that is up takes it in ms).
PUBLISH_TIMEOUT_S = 10.0
# OpenAI request fields Switchboard does not implement yet: refused by name rather than dropped.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "audio")


class ChatCompletionBody(BaseModel):
    """The subset of OpenAI's chat completion request Switchboard acts on; other fields are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description=f"`{AUTO_MODEL}` to classify, or a tier name to force it.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    metadata: RequestMetadata = Field(default_factory=RequestMetadata)


class HttpContext:
    def __init__(
        self,
        router: Router,
        replies: PendingReplies,
        reply_topics: ReplyTopics,
        api_key: str | None,
        reply_grace_s: float,
    ) -> None:
        self.router, self.replies, self.reply_topics = router, replies, reply_topics
        self.api_key, self.reply_grace_s = api_key, reply_grace_s
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


def to_chat_request(body: ChatCompletionBody, idempotency_header: str | None) -> ChatRequest:
    if body.stream:
        raise invalid(
            "streaming responses are not supported yet; send stream=false",
            "stream",
            "unsupported_value",
        )
    for name in UNSUPPORTED:
        if (body.model_extra or {}).get(name) is not None:
            raise invalid(
                f"'{name}' is not supported by Switchboard yet", name, "unsupported_parameter"
            )
    meta = body.metadata
    key = idempotency_header or meta.idempotency_key
    extra: dict[str, Any] = {}
    if key:
        extra["request_id"] = idempotent_request_id(meta.tenant, key)
        meta = meta.model_copy(update={"idempotency_key": key})
    return ChatRequest(
        model=body.model,
        messages=body.messages,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        metadata=meta,
        **extra,
    )


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
    except (TimeoutError, KafkaError) as exc:
        raise ApiError(
            503,
            f"Kafka did not take the request within {PUBLISH_TIMEOUT_S:g} s; it may still be "
            "answered. Send it again with the same Idempotency-Key: it is answered once.",
            type="service_unavailable",
            code="broker_unavailable",
        ) from exc


async def _answer(ctx: HttpContext, chat: ChatRequest, reply_to: str) -> JSONResponse:
    try:
        routed = ctx.router.route(chat, reply_to)
    except UnknownModel as exc:
        raise invalid(str(exc), "model", "model_not_found") from exc
    except BadImage as exc:
        raise invalid(f"'{exc.param}': {exc.message}", exc.param, exc.code) from exc
    future, first = ctx.replies.expect(chat.request_id)
    try:
        if first:
            await _publish(ctx, routed)
        wait_s = (
            (routed.deadline_at - routed.routed_at).total_seconds() if routed.deadline_at else 600
        )
        outcome = await asyncio.wait_for(asyncio.shield(future), wait_s + ctx.reply_grace_s)
    except TimeoutError as exc:
        raise ApiError(
            504,
            f"no answer from tier {routed.tier!r} within the deadline",
            type="timeout_error",
            code="deadline_exceeded",
        ) from exc
    finally:
        if first and not future.done():
            ctx.replies.forget(chat.request_id, future)
    if not isinstance(outcome, ChatResult):
        raise from_outcome(outcome)
    completion = {**outcome.completion, "id": outcome.request_id}
    return JSONResponse(completion, headers=_headers(outcome))


def api(ctx: HttpContext) -> APIRouter:
    routes = APIRouter()

    async def require_key(request: Request) -> None:
        # A dependency, so it runs before the body is validated: a caller without the key
        # learns nothing about what a valid request looks like.
        _check_key(ctx, request)

    @routes.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatCompletionBody, request: Request) -> JSONResponse:
        chat = to_chat_request(body, request.headers.get("idempotency-key"))
        # the reply topic (generation) is kept while this caller waits on it
        reply_to = ctx.reply_topics.take()
        try:
            return await _answer(ctx, chat, reply_to)
        finally:
            ctx.reply_topics.release(reply_to)

    @routes.get("/v1/models", dependencies=[Depends(require_key)])
    async def models(request: Request) -> JSONResponse:
        spec = ctx.router.config.spec
        data: list[dict[str, Any]] = [
            {
                "id": AUTO_MODEL,
                "object": "model",
                "owned_by": "switchboard",
                "description": "classified by the routing rules",
            }
        ]
        for name, tier in spec.tiers.items():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "switchboard",
                    "description": tier.description,
                    "models": [m.label for m in tier.models],
                }
            )
        return JSONResponse({"object": "list", "data": data})

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
        return JSONResponse(exc.body(), status_code=exc.status)

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
