"""``python -m bench --quick``: every scenario's mechanics, end to end, at tiny sizes.

Figures from a quick run mean nothing (and no test times anything); what is checked is that each
scenario runs against the real processes, accounts for all of its work, stops what it started,
and that latest.json and the report carry every field the README and the issue rely on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

REQUIRED = {
    "worker": ["calls_per_s", "cpu_ms_per_call", "baseline_litellm_cpu_ms_per_call"],
    "router": ["decisions_per_s", "rule_p99_us"],
    "metrics": ["events_per_s"],
    "jobs": ["count", "completed", "jobs_per_s"],
    "rss_mb": ["router", "worker", "metrics"],
}
# rate fields a quick run may leave empty, and the window count that says why
UNTIMED_WHEN_SMALL = {"decisions_per_s": "window_messages", "events_per_s": "window_events"}


def _ours(scratch: Path) -> set[int]:
    """Processes with a file open under ``scratch``: every process the benchmark starts writes
    its log there (other runs on the same machine, such as ``make faults``, do not count)."""
    found = set()
    for p in psutil.process_iter(["pid"]):
        try:
            if any(f.path.startswith(str(scratch)) for f in p.open_files()):
                found.add(p.info["pid"])
        except psutil.Error:
            continue
    return found


def quick_bench(tmp_path: Path, only: str) -> tuple[dict[str, Any], str]:
    """``python -m bench --quick --only <only>``: its latest.json and report, after checking it
    exited 0, failed no scenario and left no process running."""
    scratch = tmp_path / "scratch"  # the benchmark's temporary files, and its processes' logs
    scratch.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            only,
            "--out",
            str(tmp_path),
            "--keep",
        ],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["quick"] is True and not latest["failed"]
    assert set(latest["scenario_s"]) == set(only.split(","))
    report = next(tmp_path.glob("*.md")).read_text()
    assert "## Targets" in report and "SIMULATOR" in report
    assert f"--only {only}" in report
    assert not _ours(scratch), "the benchmark left processes running"
    return latest, report


def figures(latest: dict[str, Any], required: dict[str, list[str]]) -> None:
    for section, fields in required.items():
        for field in fields:
            value = latest[section][field]
            if value is None and field in UNTIMED_WHEN_SMALL:
                # quick sizes can be consumed within one poll: the scenario says so, no rate
                assert latest[section][UNTIMED_WHEN_SMALL[field]] == 0, (section, field)
                continue
            assert isinstance(value, int | float) and math.isfinite(value), (section, field)


# One test, one run of every scenario: the scenarios run one after another on one pytest worker
# while the others run the rest of the suite. (Two tests marked with one xdist_group ran at once
# on two workers all the same: pytest-xdist 3.8's loadgroup did not keep them together under
# pytest 9, and two benchmarks at once overloaded the 2-core machine.)
SYNC = "sync,sync_light"
OTHERS = "startup,worker,router,metrics,jobs,redis"


@pytest.mark.timeout(900)  # the run's own limit below; the suite's default is 300 s
def test_quick_scenarios_write_every_figure(tmp_path: Path) -> None:
    latest, _ = quick_bench(tmp_path, f"{SYNC},{OTHERS}")
    sync_figures(latest)
    other_figures(latest)


def sync_figures(latest: dict[str, Any]) -> None:
    figures(latest, {"rss_mb": ["router"]})
    for rate in ("20",):
        for target in ("direct", "switchboard", "litellm", "litellm_workers"):
            cell = latest["sync"][rate][target]
            assert {"p50_ms", "p95_ms", "p99_ms", "errors"} <= cell.keys()
    assert latest["sync"]["detail"]["litellm_proxies"]["litellm_workers"]["workers"] == (
        os.cpu_count() or 1
    )
    light = latest["sync_light"]
    for concurrency in light["concurrency"]:
        cell = light["rates"]["20"][f"switchboard_c{concurrency}"]
        assert cell["errors"] == 0 and cell["p50_ms"] > 0, concurrency
        peak = cell["connections_peak"]  # the worker's pools were watched, and were used
        assert peak["simulator"] >= 1 and 1 <= peak["redis"] <= 64, (concurrency, peak)
    assert light["default_concurrency"] in light["concurrency"]
    assert light["rates"]["20"]["direct"]["errors"] == 0
    # the proxies run in sync_light's full run only: the quick sync scenario drives both
    assert not light["peers"] and "litellm" not in light["rates"]["20"]


def other_figures(latest: dict[str, Any]) -> None:
    figures(latest, REQUIRED)
    assert latest["startup"]["make_up_ready_s"] > 0
    assert latest["jobs"]["completed"] == latest["jobs"]["count"]
    assert latest["jobs"]["errors"] == 0 and latest["jobs"]["duplicates"] == 0
    assert latest["metrics"]["rows"] == latest["metrics"]["events"]
    # the shadow's cost at each share: every mirror compared, none dropped
    shadow = latest["worker"]["experiments"]["shadow"]
    assert [r["share_pct"] for r in shadow["shares"]] == [0, 10, 50, 100]
    for row in shadow["shares"]:
        bursts = shadow["bursts_per_share"]
        assert row["mirrored"] == bursts * shadow["calls_per_burst"] * row["share_pct"] // 100
        assert row["outcomes"] == ({"compared": row["mirrored"]} if row["mirrored"] else {})
    assert {t["target"] for t in latest["targets"]} >= {"one worker, calls/s", "async jobs/s"}
