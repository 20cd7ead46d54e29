"""``stream=true`` over HTTP: a request's replies (chunks, then its outcome) as server-sent events.

A worker publishes a streamed answer as ``StreamChunk`` records on this router's reply topic,
then the ChatResult (or ChatError). ``StreamRelay`` turns them into OpenAI's
``chat.completion.chunk`` events:

- It follows one stream, the first whose chunk arrives, and shows each of its chunks once, in
  ``seq`` order (a repeated record is dropped, an early one held until its turn). Chunks of any
  other stream (a redelivery answering the request afresh) are not shown: text from two model
  calls would not add up to one answer.
- An outcome that closes the stream followed, with every chunk shown, ends it cleanly: a usage
  chunk when ``stream_options.include_usage`` asked, then ``[DONE]``.
- An answer stored earlier (a resend with the same Idempotency-Key) arrives whole: it is shown
  as one chunk.
- Anything else after the first chunk (an error, the stream cut off, a redelivery's answer, the
  deadline) ends with an error event and no ``[DONE]``: the client knows its answer is partial.

``RelayResponse`` sends the events and watches the connection: a client that leaves is noticed
at once, not at the next send, and ``on_disconnect`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response

from schemas.v1 import ChatError, ChatResult, Outcome, StreamChunk
from services.router.errors import ApiError, from_outcome

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def error_event(error: ApiError) -> bytes:
    """OpenAI's in-stream error: the openai SDK raises ``APIError`` with it."""
    return sse(error.body())


class StreamRelay:
    """One streamed request's replies → SSE event bytes (see the module's docstring)."""

    def __init__(self, request_id: str, created: int, include_usage: bool) -> None:
        self.request_id, self.created, self.include_usage = request_id, created, include_usage
        self.following: str | None = None  # the stream shown
        self.model: str | None = None
        self.shown = 0  # chunks of it shown: the next seq due
        self._early: dict[int, StreamChunk] = {}
        self.ignored = 0  # chunks of other streams, and repeats

    def take(self, chunk: StreamChunk) -> list[bytes]:
        """The events ``chunk`` lets out now (none, itself, or it and the early ones after it)."""
        if self.following is None:
            self.following, self.model = chunk.stream, chunk.model
        if chunk.stream != self.following or chunk.seq < self.shown or chunk.seq in self._early:
            self.ignored += 1
            return []
        self._early[chunk.seq] = chunk
        out = []
        while self.shown in self._early:
            out.append(self._event(self._early.pop(self.shown).choices))
            self.shown += 1
        return out

    def finish(self, outcome: Outcome) -> list[bytes]:
        """The last events: clean (usage, ``[DONE]``) or an error event."""
        if isinstance(outcome, ChatError):
            return [error_event(from_outcome(outcome))]
        if self.following is None:  # answered whole: a stored answer served again
            self.model = outcome.model
            return [self._event(_as_deltas(outcome.completion)), *self._end(outcome)]
        mark = outcome.stream
        if mark is not None and mark.id == self.following and mark.chunks == self.shown:
            return self._end(outcome)
        return [error_event(interrupted(self.shown))]

    def _end(self, outcome: ChatResult) -> list[bytes]:
        if not self.include_usage:
            return [DONE]
        usage = {**self._envelope(), "choices": [], "usage": outcome.usage.model_dump()}
        return [sse(usage), DONE]

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model or "",
        }

    def _event(self, choices: list[dict[str, Any]]) -> bytes:
        body = {**self._envelope(), "choices": choices}
        if self.include_usage:
            body["usage"] = None  # as OpenAI does: usage comes alone in the last chunk
        return sse(body)


def interrupted(shown: int) -> ApiError:
    return ApiError(
        502,
        f"the answer's stream was interrupted after {shown} chunk(s) (the worker answering it "
        "stopped, and another answered it afresh); send it again with the same "
        "Idempotency-Key to get the whole answer",
        type="upstream_error",
        code="stream_interrupted",
    )


def _as_deltas(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole ``chat.completion``'s choices as chunk choices (one delta each)."""
    out = []
    for choice in completion.get("choices") or []:
        message = dict(choice.get("message") or {})
        delta: dict[str, Any] = {"role": "assistant"}
        for key in ("content", "reasoning_content", "refusal"):
            if message.get(key) is not None:
                delta[key] = message[key]
        calls = message.get("tool_calls")
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        out.append(
            {
                "index": choice.get("index", 0),
                "delta": delta,
                "logprobs": choice.get("logprobs"),
                "finish_reason": choice.get("finish_reason"),
            }
        )
    return out


class RelayResponse(Response):
    """An SSE response that also listens for the client leaving (ASGI, not Starlette's
    ``StreamingResponse``: under ASGI 2.4 that one notices a gone client only when a send fails,
    which for a slow model may be seconds later). ``on_close`` runs however it ends;
    ``on_disconnect`` first, when the client left before the last event."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: dict[str, str],
        on_close: Callable[[], None],
        on_disconnect: Callable[[], Awaitable[None]],
    ) -> None:
        # (Response's __init__ is not called: this class sends its own messages; it derives
        # from Response so FastAPI hands it to the server as it is)
        self.status_code, self.background = 200, None
        self.events, self.extra_headers = events, headers
        self.on_close, self.on_disconnect = on_close, on_disconnect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        left = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                        *((k.encode(), v.encode()) for k, v in self.extra_headers.items()),
                    ],
                }
            )
            pump = asyncio.ensure_future(self._pump(send))
            watch = asyncio.ensure_future(until_disconnect(receive))
            try:
                await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, watch):
                    task.cancel()
                results = tuple(await asyncio.gather(pump, watch, return_exceptions=True))
            left = watch.done() and not watch.cancelled() and not pump_finished(pump, results)
            if isinstance(results[0], OSError):  # the send found the client gone
                left = True
        finally:
            try:
                if left:
                    await self.on_disconnect()
            finally:
                self.on_close()

    async def _pump(self, send: Any) -> None:
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]


def pump_finished(pump: asyncio.Future[None], results: tuple[Any, ...]) -> bool:
    """Did the pump send its last event (rather than being stopped or failing)?"""
    return pump.done() and not pump.cancelled() and results[0] is None


async def until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
