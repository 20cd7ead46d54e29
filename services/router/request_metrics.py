"""Each HTTP chat completion counted and timed (switchboard_router_requests_total and
switchboard_router_request_duration_seconds; docs/metrics.md has the statuses).

``RequestMetrics`` is the outermost middleware, so it also sees what is answered before the
handler runs (a missing key, a body over the limit, a body that does not validate) and the 500 of
an unexpected error. The HTTP status says most of the outcome; the handler adds what it alone
knows on the request's ``Note``: the tier it chose, whether an error came from the worker side,
and how a stream that had begun (status 200) ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from services.common import telemetry
from services.common.telemetry import RouterStatus

CHAT_PATH = "/v1/chat/completions"
_NOTE = "switchboard_note"  # its key in the request's state


@dataclass(slots=True)
class Note:
    tier: str = ""  # the tier the request was routed to ("" until one is decided)
    upstream: bool = False  # the error answered came from the worker side (a ChatError)
    status: RouterStatus | None = None  # how a begun stream ended, when not "ok"


def note_of(request: Request) -> Note:
    """The request's ``Note``; a spare one when no ``RequestMetrics`` wraps the app."""
    note = request.scope.get("state", {}).get(_NOTE)
    return note if isinstance(note, Note) else Note()


def status_of(code: int | None, note: Note) -> RouterStatus:
    """The request's status label from its HTTP status (None: no response was sent)."""
    if note.status is not None:
        return note.status
    if code is None:
        return "error"
    if code < 400:
        return "ok"
    if code == 499:  # the client left a stream before its first chunk
        return "cancelled"
    if code == 504:
        return "timeout"
    if note.upstream:
        return "error"
    if code == 503:  # the broker away, too many callers waiting, shutting down
        return "unavailable"
    return "rejected" if code < 500 else "error"


class RequestMetrics:
    """Plain ASGI (no extra task per request, unlike ``BaseHTTPMiddleware``); other paths pass
    through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        note = Note()
        scope.setdefault("state", {})[_NOTE] = note
        code: int | None = None

        async def tracked(message: Any) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            telemetry.router_answered(
                note.tier, status_of(code, note), time.perf_counter() - started
            )
