"""A window's rows, read through the metrics service's query endpoint (the one way to a chDB
store its metrics service owns, and as good as any to a ClickHouse server)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from schemas.topics import EVENTS_TABLE, FEEDBACK_TABLE
from services.common.sql import literal
from services.controller.domain import SideData, Window

# latencies sampled per side: plenty for a p99 and its bound, and a bounded answer
SAMPLE = 20_000
ERROR_STATUSES = ("error", "timeout", "rate_limited", "cut_off")


class FiguresUnavailable(RuntimeError):
    """The query endpoint did not answer: the controller holds and tries again."""


class Figures(Protocol):
    async def window(
        self, experiment: str, candidate: str, share_pct: float, since: datetime
    ) -> Window: ...


def window_sql(
    database: str, experiment: str, candidate: str, share_pct: float, since: datetime
) -> str:
    errors = ", ".join(literal(s) for s in ERROR_STATUSES)
    at = since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"""
SELECT if(variant = 'candidate', 'candidate', 'baseline') AS side,
       uniqExact(request_id) AS requests,
       count() AS attempts,
       countIf(status IN ({errors})) AS errors,
       sumIf(tokens_in + tokens_out, status = 'ok') AS tokens,
       sumIf(cost_usd, status = 'ok') AS cost_usd,
       groupArraySampleIf({SAMPLE}, 1)(latency_ms, status = 'ok') AS latencies,
       groupArraySampleIf({SAMPLE}, 1)(assumeNotNull(ttft_ms), status = 'ok' AND ttft_ms IS NOT NULL)
           AS ttfts
FROM {database}.{EVENTS_TABLE}
WHERE experiment = {literal(experiment)}
  AND share_pct = {float(share_pct)!r}
  AND ts >= toDateTime64({literal(at)}, 3, 'UTC')
  AND (variant = 'baseline' OR (variant = 'candidate' AND model = {literal(candidate)}))
GROUP BY side
"""


def feedback_sql(
    database: str, experiment: str, candidate: str, share_pct: float, since: datetime
) -> str:
    """Scores per side for the window's requests (feedback may come after the window)."""
    at = since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"""
SELECT if(e.variant = 'candidate', 'candidate', 'baseline') AS side,
       count() AS feedback, avg(f.score) AS score_mean, varSamp(f.score) AS score_var
FROM {database}.{FEEDBACK_TABLE} AS f
INNER JOIN (
    SELECT DISTINCT request_id, variant FROM {database}.{EVENTS_TABLE}
    WHERE experiment = {literal(experiment)}
      AND share_pct = {float(share_pct)!r}
      AND ts >= toDateTime64({literal(at)}, 3, 'UTC')
      AND (variant = 'baseline' OR (variant = 'candidate' AND model = {literal(candidate)}))
) AS e ON f.request_id = e.request_id
WHERE f.score IS NOT NULL
GROUP BY side
"""


def with_feedback(window: Window, columns: list[str], rows: list[list[Any]]) -> Window:
    sides = {"candidate": window.candidate, "baseline": window.baseline}
    for row in rows:
        r = dict(zip(columns, row, strict=True))
        n = int(r["feedback"])
        variance = r["score_var"]
        sides[r["side"]] = replace(
            sides[r["side"]],
            feedback=n,
            score_mean=float(r["score_mean"]),
            score_var=float(variance) if n >= 2 and variance is not None else None,
        )
    return Window(sides["candidate"], sides["baseline"])


def window_from_rows(columns: list[str], rows: list[list[Any]]) -> Window:
    sides: dict[str, SideData] = {}
    for row in rows:
        r = dict(zip(columns, row, strict=True))
        sides[r["side"]] = SideData(
            requests=int(r["requests"]),
            attempts=int(r["attempts"]),
            errors=int(r["errors"]),
            tokens=int(r["tokens"]),
            cost_usd=float(r["cost_usd"]),
            latencies_ms=[float(v) for v in r["latencies"]],
            ttfts_ms=[float(v) for v in r["ttfts"]],
        )
    return Window(sides.get("candidate", SideData()), sides.get("baseline", SideData()))


class EndpointFigures:
    def __init__(self, url: str, token: str | None, database: str, timeout_s: float) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s)
        self._database = database

    async def window(
        self, experiment: str, candidate: str, share_pct: float, since: datetime
    ) -> Window:
        args = (self._database, experiment, candidate, share_pct, since)
        window = window_from_rows(*await self._query(window_sql(*args)))
        return with_feedback(window, *await self._query(feedback_sql(*args)))

    async def _query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        try:
            resp = await self._client.post("/query", json={"sql": sql})
        except httpx.HTTPError as exc:
            raise FiguresUnavailable(f"metrics query endpoint: {exc!r}") from exc
        if resp.status_code != 200:
            raise FiguresUnavailable(
                f"metrics query endpoint answered {resp.status_code}: {resp.text[:500]}"
            )
        body = resp.json()
        return body["columns"], body["rows"]

    async def close(self) -> None:
        await self._client.aclose()
