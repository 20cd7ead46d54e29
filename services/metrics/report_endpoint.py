"""``GET /report``: the decision matrix and its charts as one HTML page, from the metrics service's
own store (the same page as ``switchboard report --format html``).

Query parameters, all optional: ``since`` and ``until`` (a duration back from now such as
``30m``, ``24h``, ``7d``, or an ISO 8601 time; default the last 24 h), ``tenant``, ``source``
(auto, events, aggregate), ``format`` (html, or json for the matrix rows). Behind the query
endpoint's bearer token when one is set.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from services.metrics.adapters.store import EventStore
from services.metrics.domain import report
from services.metrics.domain.report import ReportError, parse_when

_PARAMS = frozenset({"since", "until", "tenant", "source", "format"})


def _refused(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    error = {"message": message} | ({"param": param} if param else {})
    return JSONResponse({"error": error}, status)


def report_route(store: EventStore, token: str | None, database: str) -> Route:
    async def page(request: Request) -> Response:
        if token and not secrets.compare_digest(
            request.headers.get("authorization", ""), f"Bearer {token}"
        ):
            return _refused("bad or missing bearer token", status=401)
        params = request.query_params
        if unknown := sorted(set(params) - _PARAMS):
            return _refused(
                f"unknown parameter {unknown[0]!r} (takes {', '.join(sorted(_PARAMS))})",
                unknown[0],
            )
        fmt = params.get("format", "html")
        if fmt not in ("html", "json"):
            return _refused(f"format: {fmt!r} is not html or json", "format")
        now = datetime.now(UTC)
        try:
            window = report.Window(
                parse_when(params.get("since", "24h"), now),
                parse_when(params["until"], now) if "until" in params else now,
                params.get("tenant") or None,
            )
            source = report.choose_source(window, params.get("source", "auto"), now)
        except ReportError as exc:
            return _refused(str(exc))
        asked = report.queries(database, window, source, charts=fmt == "html")
        try:
            answers = await asyncio.gather(*(store.query(sql) for sql in asked.values()))
        except Exception as exc:
            return _refused(f"ClickHouse: {str(exc)[:1000]}", status=502)
        found = report.assemble(window, source, dict(zip(asked, answers, strict=True)))
        if fmt == "json":
            return Response(json.dumps(found.matrix, default=str), media_type="application/json")
        from services.metrics.domain.report_html import render  # plotly: only when drawn

        return HTMLResponse(await asyncio.to_thread(render, found))

    return Route("/report", page, methods=["GET"])
