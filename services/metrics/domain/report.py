"""The analysts' decision matrix: per tier and model, what it costs and how fast it answers."""

from __future__ import annotations

REPORT_COLUMNS = (
    "tier",
    "model",
    "requests",
    "attempts",
    "error_rate",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "ttft_p50_ms",
    "input_tokens",
    "output_tokens",
    "total_cost_usd",
    "usd_per_1k_tokens",
)


def decision_matrix_sql(table: str, since_hours: float) -> str:
    """Latency quantiles are over successful attempts; error_rate over all attempts."""
    hours = float(since_hours)
    return f"""
SELECT
    tier,
    model,
    uniqExact(request_id)                                  AS requests,
    count()                                                AS attempts,
    round(countIf(status != 'ok') / count(), 4)            AS error_rate,
    round(quantileExactIf(0.50)(latency_ms, status = 'ok'), 1) AS p50_ms,
    round(quantileExactIf(0.95)(latency_ms, status = 'ok'), 1) AS p95_ms,
    round(quantileExactIf(0.99)(latency_ms, status = 'ok'), 1) AS p99_ms,
    round(quantileExactIf(0.50)(ttft_ms, status = 'ok' AND ttft_ms IS NOT NULL), 1) AS ttft_p50_ms,
    sum(tokens_in)                                         AS input_tokens,
    sum(tokens_out)                                        AS output_tokens,
    round(sum(cost_usd), 6)                                AS total_cost_usd,
    round(if(sum(tokens_in + tokens_out) = 0, 0,
             sum(cost_usd) * 1000 / sum(tokens_in + tokens_out)), 6) AS usd_per_1k_tokens
FROM {table}
WHERE ts >= now64(3) - toIntervalSecond({int(hours * 3600)})
GROUP BY tier, model
ORDER BY tier, model
"""


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


def cascade_sql(table: str, since_hours: float) -> str:
    """Per cascade tier: how many drafts were rejected, and what the cascade cost and took per
    request against the strong model alone. A request's cost and time are the sums over its
    calls (draft, judge, escalation: one after another). The strong model's figures come from
    the escalated requests' own escalation calls: what every request would have cost and taken,
    as far as the requests it did answer tell (they are the harder ones, so this leans high)."""
    hours = float(since_hours)
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
    FROM {table}
    WHERE ts >= now64(3) - toIntervalSecond({int(hours * 3600)}) AND cascade_step != ''
    GROUP BY tier, request_id
    HAVING countIf(cascade_step = 'draft') > 0
)
GROUP BY tier
ORDER BY tier
"""
