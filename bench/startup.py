"""Scenario 6b: start-up time of ``make up`` on a warm machine (venv installed, files cached).

Runs ``make up`` exactly as the README says, times it to the ``switchboard ready`` line, reads
the idle RSS of every process it started (pids from the stack file), then stops it with Ctrl-C
(SIGINT to its process group) and times the orderly stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from bench.common import ROOT, Bench, Section, base_env
from switchboard.embedded import free_port


def _start_once(bench: Bench, run: int) -> dict[str, object]:
    data_dir = bench.work_dir / f"up-{run}"
    env = base_env(SWITCHBOARD_PORT=str(free_port()), SWITCHBOARD_DATA_DIR=str(data_dir))
    log = (bench.log_dir / f"make-up-{run}.log").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(
        ["make", "-s", "up"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    ready_s: float | None = None
    rss: dict[str, float] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith("switchboard ready"):
                ready_s = time.perf_counter() - started
                break
        if ready_s is None:
            raise RuntimeError(f"make up exited without getting ready; see {log.name}")
        state = json.loads((data_dir / "run" / "stack.json").read_text())
        for name, pid in state["pids"].items():
            try:
                rss[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
            except psutil.Error:
                rss[name] = float("nan")
    finally:
        stop_started = time.perf_counter()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stop_s = time.perf_counter() - stop_started
        log.close()
    return {"ready_s": round(ready_s, 1), "stop_s": round(stop_s, 1), "rss_mb_idle": rss}


def run(bench: Bench) -> Section:
    if not bench.quick:  # a quick run's figure means nothing, and its start-up is the warm-up
        _start_once(bench, 0)  # warms the page cache and the bytecode; not counted
    runs = [_start_once(bench, i) for i in range(1, bench.scale(3, 1) + 1)]
    ready = sorted(float(r["ready_s"]) for r in runs)  # type: ignore[arg-type]
    stops = [float(r["stop_s"]) for r in runs]  # type: ignore[arg-type]
    rss = runs[-1]["rss_mb_idle"]
    assert isinstance(rss, dict)
    data = {
        "make_up_ready_s": ready[len(ready) // 2],
        "runs_ready_s": ready,
        "stop_s": stops,
        "rss_mb_idle": rss,
    }
    lines = [
        "## Start-up of `make up` (warm)",
        "",
        f"`make up` to `switchboard ready`: **{data['make_up_ready_s']} s** (median of "
        f"{len(ready)}: {', '.join(str(r) for r in ready)} s); Ctrl-C to all stopped: "
        f"{', '.join(str(s) for s in stops)} s.",
        "",
        "| process | idle RSS MB |",
        "|---|---:|",
        *(f"| {name} | {mb} |" for name, mb in rss.items()),
        f"| all | {round(sum(rss.values()), 1)} |",
    ]
    return Section("startup", data, "\n".join(lines))


if __name__ == "__main__":
    import tempfile

    b = Bench(Path(tempfile.mkdtemp()), quick=True)
    print(run(b).markdown)
