"""Scenario 10, soak: ``bench/soak.py`` shortened for CI. The real ``switchboard up`` takes more
than 15,000 sync requests through its one router (100 requests/s for 150 s after a 5 s warm-up,
the simulated model answering in ~80 ms), with 5 async jobs/s beside them, and must end as it
began: the same criteria as ``make soak`` (no error, p99, broker CPU and RSS flat, the keeper's
record-batch counts bounded and not growing, a fresh request as fast as at the start, a clean
stop). The rate leaves the 2-core CI machine some room: at 150/s the stack and the load
generator use about both cores, and latency measures the machine's queue (docs/reliability.md).

A job lost or answered twice counts as lost or duplicated; a failed sync request (error or
timeout) counts as stuck, and so does every other criterion that failed, named in the detail.
A process of the stack still running after ``switchboard up`` stopped counts as leaked. Nothing
is written to bench/results.
"""

from __future__ import annotations

from typing import Any

from bench.common import Bench
from bench.soak import SoakParams, run_soak
from faults.common import Tally

PARAMS = SoakParams(minutes=150 / 60, rate=100, jobs_per_s=5, latency_scale=0.1, warmup_s=5)
AT_LEAST = 15_000  # sync requests through the router: well past where the reply topic wedged


def run(bench: Bench) -> Tally:
    report = run_soak(PARAMS, bench, say=lambda _: None)
    jobs = report.criterion("jobs").values
    sync = report.criterion("sync").values
    stop = report.criterion("stop").values
    tally = Tally(lost=jobs["lost"] + jobs["unsent"], duplicated=jobs["duplicated"])
    tally.stuck += sum(sync["errors"].values()) + sum(jobs["error_answers"].values())
    tally.stuck += int(bool(jobs["failure"]))  # the job producer stopped with an error
    tally.leaked += len(stop["left"])
    failed = [c for c in report.criteria if not c.passed and c.key not in ("sync", "jobs", "stop")]
    tally.stuck += len(failed) + int(stop["exit_code"] != 0 or bool(stop["aborted"]))
    pushed = report.data["requests_logged"]
    if pushed < AT_LEAST:
        tally.stuck += 1
    minutes = report.data["per_minute"]
    tally.detail = (
        f"{pushed:,} sync requests at {PARAMS.rate:g}/s, {jobs['produced']:,} jobs: "
        + "; ".join(
            f"{c.key} {'ok' if c.passed else 'FAILED'}: {c.detail}" for c in report.criteria
        )
        + f"; p99 by minute {[m['p99_ms'] for m in minutes]} ms"
        + ("" if pushed >= AT_LEAST else f"; fewer than {AT_LEAST:,} requests")
        + _noise(report.data["others_cores"])
    )
    return tally


def _noise(others: dict[str, Any]) -> str:
    if others["mean"] is None:
        return ""
    suspect = " (a busy machine: latency and CPU figures suspect)" if others["noisy"] else ""
    return f"; other programs used {others['mean']:.2f} cores on average{suspect}"
