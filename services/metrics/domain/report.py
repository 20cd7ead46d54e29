"""The analysts' decision matrix: per tier, model, variant and config, how fast, how reliable (on
clean and on noisy inputs), how much of the context window used, and at what cost.

Pure: ``queries`` says what to ask ClickHouse, ``assemble`` turns the answers into a ``Report``;
the caller runs the SQL (``switchboard report`` through the metrics service or chDB, the metrics
service's ``GET /report`` on its own store).

Two sources answer the same questions:

- ``events``: llm_events, one row per attempt, exact quantiles, kept 7 days; the only one that
  can filter by tenant;
- ``aggregate``: llm_events_1m, per minute and (tier, model, variant, config), t-digest
  quantiles; what keeps a week's report fast, and what answers beyond the raw rows' 7 days.

A figure with nothing to measure (no successful call for a latency, no streamed call for a TTFT,
no noisy input, no known context window) is left blank, and the row's ``notes`` say why.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from services.common.sql import literal, tenant_hash

Source = Literal["events", "aggregate"]
Results = dict[str, tuple[list[str], list[list[Any]]]]

# auto picks the aggregate for ranges longer than this (and always beyond the raw rows' TTL)
AGGREGATE_AFTER = timedelta(hours=24)
EVENTS_KEPT = timedelta(days=7)
# The latency CDF's levels: every percent, then the tail.
CDF_LEVELS = (*(round(i / 100, 2) for i in range(1, 100)), 0.995, 0.999)
# Context-window use histogram: this many bins over 0..100 % (a prompt over the window counts
# in the last bin).
WINDOW_BINS = 20
# The time series' step: the first of these (seconds) that gives at most SERIES_POINTS points.
STEPS_S = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400)
SERIES_POINTS = 120

KEYS = ("tier", "model", "variant", "config_hash")
MATRIX_COLUMNS = (
    *KEYS,
    "requests",
    "attempts",
    "error_rate",
    "noisy_attempts",
    "noisy_error_rate",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "ttft_p99_ms",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "usd_per_1k_tokens",
    "window_use_p50",
    "window_use_p95",
    "window_use_max",
    "fallback_rate",
    "escalation_rate",
    "notes",
)
# Why a figure is blank, by the columns it blanks.
BLANK_WHY = {
    ("p50_ms", "p95_ms", "p99_ms"): "latency: no successful call",
    ("ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms"): "ttft: no streamed call succeeded",
    ("noisy_error_rate",): "noisy: no noisy input",
    ("usd_per_1k_tokens",): "cost/1k: no tokens counted",
    ("window_use_p50", "window_use_p95", "window_use_max"): "window: context window unknown",
}
# What each column means, for the header of a table and the page.
MEANING = {
    "variant": "baseline / candidate / shadow in an experiment, else blank",
    "error_rate": "attempts that did not succeed",
    "noisy_attempts": "attempts on inputs tagged noisy or detected truncated, garbled, very long",
    "p50_ms": "latency of successful attempts",
    "usd_per_1k_tokens": "cost per 1,000 tokens in and out",
    "window_use_p50": "tokens in / the model's maximum input",
    "fallback_rate": "requests that reached this model after another model or tier failed",
    "escalation_rate": "requests that reached this model as a cascade's escalation",
}


class ReportError(ValueError):
    """The asked range or filter cannot be answered (said to the user, not a crash)."""


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime
    tenant: str | None = None

    def __post_init__(self) -> None:
        if self.since.tzinfo is None or self.until.tzinfo is None:
            raise ReportError("since and until need a time zone")
        if self.until <= self.since:
            raise ReportError(
                f"--until ({self.until:%F %T}) is not after --since ({self.since:%F %T})"
            )

    @classmethod
    def last(cls, hours: float, tenant: str | None = None, now: datetime | None = None) -> Window:
        end = now or datetime.now(UTC)
        return cls(end - timedelta(hours=hours), end, tenant)

    @property
    def span(self) -> timedelta:
        return self.until - self.since

    def describe(self) -> str:
        text = f"{self.since:%Y-%m-%d %H:%M:%S} to {self.until:%Y-%m-%d %H:%M:%S} UTC"
        return f"{text}, tenant {self.tenant}" if self.tenant else text


_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: datetime) -> datetime:
    """``30m``, ``24h``, ``7d``, ``2w`` (that long before ``now``), or an ISO 8601 date or time
    (UTC unless it names a zone)."""
    text = text.strip()
    if text and text[-1] in _UNITS:
        try:
            amount = float(text[:-1])
        except ValueError:
            amount = -1
        if amount >= 0:
            return now - timedelta(seconds=amount * _UNITS[text[-1]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(
            f"{text!r} is neither a duration (30m, 24h, 7d, 2w) nor an ISO 8601 time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def choose_source(window: Window, asked: str = "auto", now: datetime | None = None) -> Source:
    """``asked``: auto, events or aggregate. auto takes the aggregate for long ranges and for
    ranges the raw rows no longer cover, unless a tenant is asked for (the aggregate has none)."""
    now = now or datetime.now(UTC)
    too_old = window.since < now - EVENTS_KEPT
    if asked == "events" or (asked == "auto" and window.tenant):
        if too_old:
            raise ReportError(
                f"llm_events keeps {EVENTS_KEPT.days} days: --since {window.since:%F} is older"
                + (" (per tenant, only llm_events can answer)" if window.tenant else "")
            )
        return "events"
    if asked == "aggregate":
        if window.tenant:
            raise ReportError("--tenant needs --source events: llm_events_1m keeps no tenant")
        return "aggregate"
    if asked != "auto":
        raise ReportError(f"--source: {asked!r} is not auto, events or aggregate")
    return "aggregate" if too_old or window.span > AGGREGATE_AFTER else "events"


def step_s(window: Window, source: Source) -> int:
    seconds = window.span.total_seconds()
    smallest = 60 if source == "aggregate" else 0
    for step in STEPS_S:
        if step >= smallest and seconds / step <= SERIES_POINTS:
            return step
    return STEPS_S[-1]


# --- SQL --------------------------------------------------------------------------------------


def _ts(value: datetime) -> str:
    return f"toDateTime64({literal(value.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f')[:-3])}, 3, 'UTC')"


def _where(window: Window, source: Source) -> str:
    column = "minute" if source == "aggregate" else "ts"
    since = window.since
    if source == "aggregate":  # whole minutes: the one holding `since` counts
        since = since.replace(second=0, microsecond=0)
    where = f"{column} >= {_ts(since)} AND {column} < {_ts(window.until)}"
    if window.tenant and source == "events":
        where += f" AND tenant_hash = {literal(tenant_hash(window.tenant))}"
    return where


def _levels(levels: tuple[float, ...]) -> str:
    return ", ".join(f"{x:g}" for x in levels)


def matrix_sql(db: str, window: Window, source: Source) -> str:
    where = _where(window, source)
    if source == "aggregate":
        return f"""
SELECT tier, model, variant, config_hash,
    uniqMerge(requests) AS n_requests, sum(attempts) AS n_attempts, sum(errors) AS n_errors, sum(ok) AS n_ok,
    sum(streamed) AS n_streamed, sum(windowed) AS n_windowed,
    sum(noisy) AS n_noisy, sum(noisy_errors) AS n_noisy_errors,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_ms) AS latency_q,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(ttft_ms) AS ttft_q,
    sum(tokens_in) AS n_in, sum(tokens_out) AS n_out, sum(cost_usd) AS cost,
    quantilesTDigestMerge(0.5, 0.95)(window_use) AS use_q, max(window_use_max) AS use_max,
    sum(fallbacks) AS n_fallbacks, sum(escalations) AS n_escalations
FROM {db}.llm_events_1m WHERE {where}
GROUP BY tier, model, variant, config_hash ORDER BY tier, model, variant, config_hash
"""
    return f"""
SELECT tier, model, variant, config_hash,
    uniqExact(request_id) AS n_requests, count() AS n_attempts, countIf(status != 'ok') AS n_errors,
    countIf(status = 'ok') AS n_ok, countIf(status = 'ok' AND ttft_ms IS NOT NULL) AS n_streamed,
    countIf(context_window > 0) AS n_windowed,
    countIf(input_noise != '') AS n_noisy,
    countIf(input_noise != '' AND status != 'ok') AS n_noisy_errors,
    quantilesExactIf(0.5, 0.95, 0.99)(latency_ms, status = 'ok') AS latency_q,
    quantilesExactIf(0.5, 0.95, 0.99)(assumeNotNull(ttft_ms), status = 'ok' AND ttft_ms IS NOT NULL) AS ttft_q,
    sum(tokens_in) AS n_in, sum(tokens_out) AS n_out, sum(cost_usd) AS cost,
    quantilesExactIf(0.5, 0.95)(tokens_in / context_window, context_window > 0) AS use_q,
    maxIf(tokens_in / context_window, context_window > 0) AS use_max,
    countIf(retry = 0 AND (attempt > 0 OR startsWith(rule, 'fallback:'))) AS n_fallbacks,
    countIf(cascade_step = 'escalation') AS n_escalations
FROM {db}.llm_events WHERE {where}
GROUP BY tier, model, variant, config_hash ORDER BY tier, model, variant, config_hash
"""


def series_sql(db: str, window: Window, source: Source) -> str:
    """Per model and step: p95 latency, error rate, attempts."""
    step = step_s(window, source)
    where = _where(window, source)
    if source == "aggregate":
        return f"""
SELECT toStartOfInterval(minute, INTERVAL {step} SECOND) AS t, model,
    quantilesTDigestMerge(0.95)(latency_ms)[1] AS p95_ms,
    sum(errors) / sum(attempts) AS error_rate, sum(attempts) AS n_attempts
FROM {db}.llm_events_1m WHERE {where} GROUP BY t, model ORDER BY model, t
"""
    return f"""
SELECT toStartOfInterval(ts, INTERVAL {step} SECOND) AS t, model,
    quantileExactIf(0.95)(latency_ms, status = 'ok') AS p95_ms,
    countIf(status != 'ok') / count() AS error_rate, count() AS n_attempts
FROM {db}.llm_events WHERE {where} GROUP BY t, model ORDER BY model, t
"""


def cdf_sql(db: str, window: Window, source: Source) -> str:
    where = _where(window, source)
    levels = _levels(CDF_LEVELS)
    if source == "aggregate":
        return f"""
SELECT model, quantilesTDigestMerge({levels})(latency_ms) AS latency, sum(ok) AS calls
FROM {db}.llm_events_1m WHERE {where} GROUP BY model ORDER BY model
"""
    return f"""
SELECT model, quantilesExactIf({levels})(latency_ms, status = 'ok') AS latency,
    countIf(status = 'ok') AS calls
FROM {db}.llm_events WHERE {where} GROUP BY model ORDER BY model
"""


def window_sql(db: str, window: Window) -> str:
    """Attempts per model and bin of context-window use (from llm_events: a histogram needs
    the rows, so for a range beyond their 7 days it covers what is left of it)."""
    return f"""
SELECT model, toUInt8(least(floor(tokens_in / context_window * {WINDOW_BINS}), {WINDOW_BINS - 1})) AS bin,
    count() AS attempts
FROM {db}.llm_events WHERE {_where(window, "events")} AND context_window > 0
GROUP BY model, bin ORDER BY model, bin
"""


def canary_sql(db: str, window: Window) -> str:
    return f"""
SELECT decided_at, experiment, tier, action, share_from, share_to, reason
FROM {db}.decisions FINAL
WHERE decided_at >= {_ts(window.since)} AND decided_at < {_ts(window.until)}
ORDER BY decided_at
"""


def canary_traffic_sql(db: str, window: Window, source: Source) -> str:
    """Per tier in an experiment and step: the candidate's share of its requests."""
    step = step_s(window, source)
    if source == "aggregate":
        return f"""
SELECT toStartOfInterval(minute, INTERVAL {step} SECOND) AS t, tier,
    uniqMergeIf(requests, variant = 'candidate') AS candidate,
    uniqMergeIf(requests, variant IN ('baseline', 'candidate')) AS total
FROM {db}.llm_events_1m WHERE {_where(window, source)} AND variant IN ('baseline', 'candidate')
GROUP BY t, tier ORDER BY tier, t
"""
    return f"""
SELECT toStartOfInterval(ts, INTERVAL {step} SECOND) AS t, tier,
    uniqExactIf(request_id, variant = 'candidate') AS candidate, uniqExact(request_id) AS total
FROM {db}.llm_events WHERE {_where(window, source)} AND variant IN ('baseline', 'candidate')
GROUP BY t, tier ORDER BY tier, t
"""


def queries(db: str, window: Window, source: Source, charts: bool = False) -> dict[str, str]:
    """What to ask, by name: the matrix, and with ``charts`` what the page draws."""
    asked = {"matrix": matrix_sql(db, window, source)}
    if charts:
        asked |= {
            "series": series_sql(db, window, source),
            "cdf": cdf_sql(db, window, source),
            "window": window_sql(db, window),
            "canary": canary_sql(db, window),
            "canary_traffic": canary_traffic_sql(db, window, source),
        }
    return asked


# --- answers → report -------------------------------------------------------------------------


@dataclass
class Report:
    window: Window
    source: Source
    matrix: list[dict[str, Any]]
    step_s: int = 0
    # model → [(t, p95_ms | None, error_rate, attempts)]
    series: dict[str, list[tuple[datetime, float | None, float, int]]] = field(default_factory=dict)
    cdf: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (ms, level)
    window_use: dict[str, list[int]] = field(default_factory=dict)  # attempts per bin
    decisions: list[dict[str, Any]] = field(default_factory=list)
    # tier → [(t, the candidate's share of its requests in an experiment, %)]
    canary_traffic: dict[str, list[tuple[datetime, float]]] = field(default_factory=dict)

    @property
    def columns(self) -> tuple[str, ...]:
        return MATRIX_COLUMNS

    def rows(self) -> list[list[Any]]:
        return [[row[c] for c in MATRIX_COLUMNS] for row in self.matrix]

    def cost_per_1k(self) -> dict[str, float | None]:
        """Per model, over all its rows."""
        cost: dict[str, float] = defaultdict(float)
        tokens: dict[str, int] = defaultdict(int)
        for row in self.matrix:
            cost[row["model"]] += row["cost_usd"]
            tokens[row["model"]] += row["tokens_in"] + row["tokens_out"]
        return {m: (cost[m] * 1000 / tokens[m] if tokens[m] else None) for m in sorted(cost)}


def _num(value: Any) -> float | None:
    """A figure, or None for what ClickHouse answers when there was nothing to measure."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) or math.isinf(number) else number


def _rounded(value: Any, digits: int) -> float | None:
    number = _num(value)
    return None if number is None else round(number, digits)


def _figures(values: list[Any], digits: int, measured: Any) -> list[float | None]:
    return [_rounded(v, digits) if int(measured) else None for v in values]


def _at(columns: list[str], rows: list[list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(columns, row, strict=True)) for row in rows]


def matrix_rows(columns: list[str], rows: list[list[Any]]) -> list[dict[str, Any]]:
    out = []
    for raw in _at(columns, rows):
        attempts, requests = int(raw["n_attempts"]), int(raw["n_requests"])
        noisy = int(raw["n_noisy"])
        tokens_in, tokens_out, cost = int(raw["n_in"]), int(raw["n_out"]), float(raw["cost"])
        # an empty quantile reads 0 or nan depending on the function: the counts decide
        latency = _figures(raw["latency_q"], 1, raw["n_ok"])
        ttft = _figures(raw["ttft_q"], 1, raw["n_streamed"])
        use = _figures([*raw["use_q"], raw["use_max"]], 6, raw["n_windowed"])
        row: dict[str, Any] = {k: raw[k] for k in KEYS}
        row |= {
            "requests": requests,
            "attempts": attempts,
            "error_rate": round(int(raw["n_errors"]) / attempts, 4) if attempts else None,
            "noisy_attempts": noisy,
            "noisy_error_rate": round(int(raw["n_noisy_errors"]) / noisy, 4) if noisy else None,
            "p50_ms": latency[0],
            "p95_ms": latency[1],
            "p99_ms": latency[2],
            "ttft_p50_ms": ttft[0],
            "ttft_p95_ms": ttft[1],
            "ttft_p99_ms": ttft[2],
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "cost_usd": round(cost, 6),
            "usd_per_1k_tokens": (
                round(cost * 1000 / (tokens_in + tokens_out), 6) if tokens_in + tokens_out else None
            ),
            "window_use_p50": use[0],
            "window_use_p95": use[1],
            "window_use_max": use[2],
            "fallback_rate": round(int(raw["n_fallbacks"]) / requests, 4) if requests else None,
            "escalation_rate": (
                round(int(raw["n_escalations"]) / requests, 4) if requests else None
            ),
        }
        row["notes"] = "; ".join(
            why for blanked, why in BLANK_WHY.items() if all(row[c] is None for c in blanked)
        )
        out.append(row)
    return out


def assemble(window: Window, source: Source, results: Results) -> Report:
    report = Report(window, source, matrix_rows(*results["matrix"]), step_s(window, source))
    if "series" in results:
        for r in _at(*results["series"]):
            report.series.setdefault(r["model"], []).append(
                (r["t"], _rounded(r["p95_ms"], 1), float(r["error_rate"]), int(r["n_attempts"]))
            )
    if "cdf" in results:
        for r in _at(*results["cdf"]):
            if int(r["calls"]):
                points = [
                    (_num(ms), level) for ms, level in zip(r["latency"], CDF_LEVELS, strict=True)
                ]
                report.cdf[r["model"]] = [(ms, level) for ms, level in points if ms is not None]
    if "window" in results:
        for r in _at(*results["window"]):
            bins = report.window_use.setdefault(r["model"], [0] * WINDOW_BINS)
            bins[int(r["bin"])] += int(r["attempts"])
    if "canary" in results:
        report.decisions = _at(*results["canary"])
    if "canary_traffic" in results:
        for r in _at(*results["canary_traffic"]):
            if int(r["total"]):
                share = 100 * int(r["candidate"]) / int(r["total"])
                report.canary_traffic.setdefault(r["tier"], []).append((r["t"], share))
    return report


# --- cascades (switchboard report --cascades) ---------------------------------------------------

CASCADE_COLUMNS = (
    "tier",
    "requests",
    "escalated",
    "escalation_rate",
    "usd_per_request",
    "strong_usd_per_request",
    "saved_pct",
    "p50_ms",
    "strong_p50_ms",
)


def cascade_sql(db: str, window: Window) -> str:
    """Per cascade tier: how many drafts were rejected, and what the cascade cost and took per
    request against the strong model alone. A request's cost and time are the sums over its
    calls (draft, judge, escalation: one after another). The strong model's figures come from
    the escalated requests' own escalation calls: what every request would have cost and taken,
    as far as the requests it did answer tell (they are the harder ones, so this leans high)."""
    return f"""
SELECT
    tier,
    count()                                                  AS requests,
    countIf(was_escalated)                                       AS escalated,
    round(countIf(was_escalated) / count(), 4)                   AS escalation_rate,
    round(avg(cost), 6)                                      AS usd_per_request,
    round(avgIf(strong_cost, was_escalated), 6)                  AS strong_usd_per_request,
    round(if(avgIf(strong_cost, was_escalated) > 0,
             100 * (1 - avg(cost) / avgIf(strong_cost, was_escalated)), 0), 1) AS saved_pct,
    round(quantileExact(0.50)(took), 1)                      AS p50_ms,
    round(quantileExactIf(0.50)(strong_took, was_escalated), 1)  AS strong_p50_ms
FROM (
    SELECT
        tier,
        request_id,
        countIf(cascade_step = 'escalation') > 0             AS was_escalated,
        sum(cost_usd)                                        AS cost,
        sumIf(cost_usd, cascade_step = 'escalation')         AS strong_cost,
        sum(latency_ms)                                      AS took,
        sumIf(latency_ms, cascade_step = 'escalation')       AS strong_took
    FROM {db}.llm_events
    WHERE {_where(window, "events")} AND cascade_step != ''
    GROUP BY tier, request_id
    HAVING countIf(cascade_step = 'draft') > 0
)
GROUP BY tier
ORDER BY tier
"""
