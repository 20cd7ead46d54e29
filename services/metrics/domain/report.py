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
