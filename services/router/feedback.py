"""``POST /v1/feedback``: a score or label for an answered request, onto the feedback topic.

Before it is published, the request it names must be known and be the caller's tenant's: the
router asks the metrics service's query endpoint for the request's rows (``Owners``), waiting a
few seconds for a request answered a moment ago (rows follow answers by about a second). The
metrics service checks every feedback record again before it stores it, so feedback produced
straight onto the topic is held to the same rule.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from schemas.control import Feedback
from services.common.kafka import Publisher
from services.common.sql import literal, tenant_hash
from services.router.errors import ApiError

log = logging.getLogger(__name__)

OWNER_WAIT_S = 5.0  # how long feedback waits for its request's rows to be written
_POLL_S = 0.25


class Owners:
    """Which tenant each request was made for, from llm_events (through the metrics service)."""

    def __init__(self, url: str, token: str | None, table: str, timeout_s: float = 10.0) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s)
        self._table = table

    async def tenant_hash_of(self, request_id: str) -> str | None:
        """The request's tenant hash ('' for none), or None while it has no rows."""
        sql = f"SELECT any(tenant_hash) FROM {self._table} WHERE request_id = {literal(request_id)}"
        sql += " GROUP BY request_id"
        try:
            resp = await self._client.post("/query", json={"sql": sql})
        except httpx.HTTPError as exc:
            raise _unavailable(
                f"the metrics service did not answer ({type(exc).__name__})"
            ) from exc
        if resp.status_code != 200:
            log.warning(
                "feedback check: metrics answered %s: %s", resp.status_code, resp.text[:300]
            )
            raise _unavailable(f"the metrics service answered {resp.status_code}")
        rows = resp.json()["rows"]
        return str(rows[0][0]) if rows else None

    async def close(self) -> None:
        await self._client.aclose()


def _unavailable(why: str) -> ApiError:
    return ApiError(
        503,
        f"feedback cannot be checked now: {why}; try again",
        type="service_unavailable",
        code="metrics_unavailable",
        headers={"retry-after": "5"},
    )


async def check_owner(owners: Owners, feedback: Feedback, wait_s: float = OWNER_WAIT_S) -> None:
    """Raise 404 for a request with no rows after ``wait_s``, 403 for another tenant's."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while (owner := await owners.tenant_hash_of(feedback.request_id)) is None:
        if loop.time() >= deadline:
            raise ApiError(
                404,
                f"no answered request {feedback.request_id!r} (in the last 7 days)",
                type="invalid_request_error",
                code="unknown_request",
                param="request_id",
            )
        await asyncio.sleep(_POLL_S)
    if owner != tenant_hash(feedback.tenant):
        raise ApiError(
            403,
            f"request {feedback.request_id!r} was not made for this tenant",
            type="permission_error",
            code="tenant_mismatch",
            param="tenant",
        )


def feedback_api(
    require_key: Any,
    owners: Owners | None,
    publisher: Publisher,
    topic: str,
    wait_s: float = OWNER_WAIT_S,
) -> APIRouter:
    routes = APIRouter()

    @routes.post("/v1/feedback", dependencies=[Depends(require_key)])
    async def feedback(body: Feedback, request: Request) -> JSONResponse:
        if owners is None:
            raise _unavailable("the router has no metrics service to ask (SWITCHBOARD_METRICS_URL)")
        await check_owner(owners, body, wait_s)
        await publisher.publish(topic, body, key=body.request_id)
        return JSONResponse(
            {
                "object": "feedback",
                "id": body.feedback_id,
                "request_id": body.request_id,
                "status": "recorded",
            },
            status_code=201,
        )

    return routes
