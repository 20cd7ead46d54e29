"""The ``stream`` scenario's figures from step results: the goal check, the overhead's parts and
the worker's chunks. Pure functions over made-up steps; no stack started."""

from __future__ import annotations

from typing import Any

import pytest

from bench.stream import goal, ttft_parts, worker_chunks
from bench.sync import Plan


def step(ttft_p50: float, errors: int = 0, sent: int = 800, **extra: Any) -> dict[str, Any]:
    return {
        "ttft_p50_ms": ttft_p50,
        "ttft_p99_ms": ttft_p50 * 2,
        "errors": errors,
        "sent": sent,
        "error_rate": errors / sent,
        "machine_cores": 1.5,
        "other_cores": 0.1,
        "cores_busy": {"worker-bench": 0.5, "router": 0.3, "broker": 0.4},
        "cpu_ms_per_request": {"worker-bench": 5.0, "router": 3.0, "broker": 4.0},
        **extra,
    }


def overhead(rates: dict[str, Any]) -> dict[str, Any]:
    return {
        rate: {
            "switchboard": {
                "p50_ms": row["switchboard"]["ttft_p50_ms"] - row["direct"]["ttft_p50_ms"]
            }
        }
        for rate, row in rates.items()
    }


@pytest.mark.parametrize(
    ("sb", "met"),
    [
        (step(95.0), True),  # 13 ms over direct's 82
        (step(97.0), True),  # exactly 15 ms
        (step(97.5), False),
        (step(90.0, errors=8), False),  # fast, but 1% of the answers failed
    ],
)
def test_the_goal_is_met_at_100_rps_under_15_ms_with_under_1_percent_errors(
    sb: dict[str, Any], met: bool
) -> None:
    rates = {"100": {"direct": step(82.0), "switchboard": sb}}
    assert goal(rates, overhead(rates))["met"] is met


def test_the_goal_is_not_measured_when_100_rps_was_not_run() -> None:
    rates = {"20": {"direct": step(82.0), "switchboard": step(90.0)}}
    assert goal(rates, overhead(rates)) == {
        "rate": 100,
        "limit_ms": 15.0,
        "overhead_p50_ms": None,
        "met": None,
    }


def test_the_overheads_parts_and_the_largest_of_them() -> None:
    rates = {"100": {"direct": step(82.0), "switchboard": step(130.0)}}
    calls = {"100": {"ttft_p50_ms": 85.0}}
    parts = ttft_parts(rates, {"hop_p50_ms": 3.5}, calls)["100"]
    assert parts["overhead_p50_ms"] == 48.0
    assert parts["model_call_in_worker"] == 3.0  # the worker's own TTFT beyond direct's
    assert parts["kafka_two_hops"] == 7.0
    assert parts["rest"] == 38.0  # 130 - 85 - 7
    assert parts["dominant"] == "rest"
    assert parts["cpu_ms_per_answer"] == 12.0


def test_without_the_workers_rows_only_the_hops_are_a_known_part() -> None:
    rates = {"100": {"direct": step(82.0), "switchboard": step(130.0)}}
    parts = ttft_parts(rates, {"hop_p50_ms": 3.5}, {})["100"]
    assert parts["model_call_in_worker"] is None and parts["rest"] is None
    assert parts["dominant"] == "kafka_two_hops"


def test_worker_chunks_per_second_cpu_per_chunk_and_coalescing() -> None:
    plan = Plan((100,), 8.0, warmup_s=1.0, prime_s=2.0, settle_s=10.0, idle_s=2.0)
    direct = step(82.0, chunks_per_answer=12.0, content_per_answer=10.0)
    sb = step(
        130.0,
        chunks_total=6400,  # 8 chunks for each of 800 answers
        warmup_chunks=800,
        chunks_per_answer=8.0,
        content_per_answer=8.0,
        cpu_s={"worker-bench": 4.5},
    )
    c = worker_chunks({"100": {"direct": direct, "switchboard": sb}}, plan)["100"]
    assert c["chunks_per_s"] == 800.0
    assert c["provider_chunks_per_s"] == 1200.0
    assert c["cpu_ms_per_chunk"] == 0.625  # 4.5 s over 7,200 chunks, warm-up included
    assert c["cpu_ms_per_answer"] == 5.0  # over 900 answers
    assert c["coalescing_ratio"] == 1.5
