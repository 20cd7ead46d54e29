"""What `switchboard replay report RUN` asks llm_shadow, and the regressions it flags. Pure.

One row per slice (``all`` first, then the slices of services/shadow/domain.py), the baseline's
figures beside the candidate's: p50/p95 latency, error rate, cost per 1k tokens (input and
output), agreement (the same response, by hash) and mean similarity. A request compared twice
(a shadow worker redelivered it) counts once, its newest comparison.

A slice is flagged when it has at least ``MIN_REQUESTS`` compared requests and the candidate:
- is slower: p95 over 1.5 x the baseline's;
- fails more: an error rate 5 points over the baseline's;
- costs more: cost per 1k tokens over 1.2 x the baseline's;
- answers differently: a mean similarity under 0.5 (only where the baseline's answer was
  captured, so there is something to compare with).
The thresholds are the example canary's criteria (config/examples/canary.yaml), so a replay
flags what a canary of the same candidate would have been held back for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.control import REPLAY_PREFIX
from services.common.sql import literal
from services.shadow.domain import SLICES

ALL = "all"
MIN_REQUESTS = 5
SLOWER = 1.5
MORE_ERRORS = 0.05
COSTLIER = 1.2
DIFFERENT = 0.5


def replay_report_sql(table: str, run: str) -> str:
    experiment = literal(REPLAY_PREFIX + run)
    return f"""
SELECT
    slice,
    count()                                                               AS requests,
    countIf(outcome = 'compared')                                         AS compared,
    countIf(outcome = 'dropped')                                          AS dropped,
    round(quantileExactIf(0.50)(baseline_latency_ms, baseline_status = 'ok'), 1)  AS base_p50_ms,
    round(quantileExactIf(0.95)(baseline_latency_ms, baseline_status = 'ok'), 1)  AS base_p95_ms,
    round(quantileExactIf(0.50)(candidate_latency_ms, outcome = 'compared'), 1)   AS cand_p50_ms,
    round(quantileExactIf(0.95)(candidate_latency_ms, outcome = 'compared'), 1)   AS cand_p95_ms,
    round(countIf(baseline_status = 'error')
          / nullIf(countIf(baseline_status != 'unknown' AND outcome != 'dropped'), 0), 4)
                                                                          AS base_error_rate,
    round(countIf(outcome = 'candidate_failed') / nullIf(countIf(outcome != 'dropped'), 0), 4)
                                                                          AS cand_error_rate,
    round(1000 * sumIf(baseline_cost_usd, baseline_status = 'ok')
          / nullIf(sumIf(baseline_tokens_in + baseline_tokens_out, baseline_status = 'ok'), 0), 6)
                                                                          AS base_cost_per_1k,
    round(1000 * sumIf(candidate_cost_usd, outcome = 'compared')
          / nullIf(sumIf(candidate_tokens_in + candidate_tokens_out, outcome = 'compared'), 0), 6)
                                                                          AS cand_cost_per_1k,
    round(avgIf(toFloat64(same_response), isNotNull(same_response)), 4)   AS agreement,
    round(avgIf(similarity, isNotNull(similarity)), 4)                    AS similarity
FROM (
    SELECT * FROM {table} FINAL
    WHERE experiment = {experiment}
    ORDER BY ts DESC
    LIMIT 1 BY request_id
)
ARRAY JOIN arrayConcat(['{ALL}'], slices) AS slice
GROUP BY slice
"""


def _order(slice_name: str) -> int:
    return -1 if slice_name == ALL else ((*SLICES, slice_name)).index(slice_name)


@dataclass(frozen=True)
class SliceRow:
    values: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.values["slice"])

    def flags(self) -> list[str]:
        """The regressions this slice shows; none below MIN_REQUESTS compared requests."""
        v = self.values
        if (v["compared"] or 0) < MIN_REQUESTS:
            return []
        found = []
        base, cand = v["base_p95_ms"], v["cand_p95_ms"]
        if base and cand is not None and cand > base * SLOWER:
            found.append(f"slower: p95 {cand:g} ms vs {base:g} ms")
        base, cand = v["base_error_rate"] or 0.0, v["cand_error_rate"]
        if cand is not None and cand > base + MORE_ERRORS:
            found.append(f"fails more: {cand:.0%} vs {base:.0%}")
        base, cand = v["base_cost_per_1k"], v["cand_cost_per_1k"]
        if base and cand is not None and cand > base * COSTLIER:
            found.append(f"costlier: ${cand:.4f} vs ${base:.4f} per 1k tokens")
        if v["similarity"] is not None and v["similarity"] < DIFFERENT:
            found.append(f"answers differ: similarity {v['similarity']:.2f}")
        return found


def slice_rows(columns: list[str], rows: list[list[Any]]) -> list[SliceRow]:
    out = [SliceRow(dict(zip(columns, row, strict=True))) for row in rows]
    return sorted(out, key=lambda r: _order(r.name))
