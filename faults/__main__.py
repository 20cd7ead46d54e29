"""``python -m faults`` (``make faults``): every scenario, one line each, then the tally.

Each scenario starts the processes it needs (Tansu, Redis, the provider SIMULATOR, router,
workers, metrics), does its damage, checks every message it sent, and stops what it started.
The last line is ``faults: <n> scenarios, lost=<L>, duplicated=<D>, stuck=<S>, leaked=<K>``;
the command exits non-zero when any count is not 0 or a scenario could not run.

    python -m faults                 # every scenario, in three phases (below)
    python -m faults --only poison   # some (comma-separated keys), one after another
    python -m faults --one-by-one    # every scenario, one after another (about 13 minutes)

The three phases, one after another:
1. the short scenarios in two lanes at once (two processes), each lane one scenario after
   another: they mostly wait (for a restart, a timeout, a drain), so two share the two cores;
2. the crash scenario alone: minutes of steady traffic under a 60 s request deadline, which
   failed in CI runs with anything beside it (docs/reliability.md);
3. the soak alone: it measures latency growth, which a neighbour's load would blur.
Each scenario still starts and stops its own processes, on its own ports, with its own scratch
directory; the tally is the sum.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import Bench
from faults import (
    auth,
    broker,
    clickhouse,
    crash,
    fuzz,
    poison,
    redis_down,
    secrets,
    shutdown,
    soak,
)
from faults.common import Tally, leaked_processes

SCENARIOS: dict[str, Callable[[Bench], Tally]] = {
    "crash": crash.run,
    "clickhouse": clickhouse.run,
    "redis": redis_down.run,
    "broker": broker.run,
    "poison": poison.run,
    "fuzz": fuzz.run,
    "auth": auth.run,
    "secrets": secrets.run,
    "shutdown": shutdown.run,
    "soak": soak.run,
}


# phase 1's lanes, about 180 s each on the 2-core CI machine (a clean-clone run of 777e42f:
# clickhouse 104, redis 58, poison 16; auth 15, secrets 25, broker 37, fuzz 45, shutdown 58 s):
# the CPU-heavy fuzz (schemathesis) beside scenarios that mostly wait, shutdown last
LANES: tuple[tuple[str, ...], ...] = (
    ("clickhouse", "redis", "poison"),
    ("auth", "secrets", "broker", "fuzz", "shutdown"),
)
ALONE = ("crash", "soak")  # phases 2 and 3
_TALLY = re.compile(
    r"^faults: (\d+) scenarios, lost=(\d+), duplicated=(\d+), stuck=(\d+), leaked=(\d+)"
)


def _phases(keep: bool) -> int:
    """The lanes at once, then each scenario of ALONE by itself; the sum of their tallies."""
    extra = ["--keep"] if keep else []
    code = 0
    followed = []
    phases: list[list[tuple[str, ...]]] = [list(LANES)] + [[(key,)] for key in ALONE]
    for phase in phases:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "faults", "--only", ",".join(lane), *extra],
                stdout=subprocess.PIPE,
                text=True,
            )
            for lane in phase
        ]
        now = [_follow(proc) for proc in procs]
        code = max([code, *(proc.wait() for proc in procs)])
        for _, pump in now:
            pump.join()  # every line read, the tally line included
        followed += now
    tallies = [found for found, _ in followed]
    counts = [sum(t[i] for t in tallies) for i in range(5)]
    print(
        f"faults: {counts[0]} scenarios, lost={counts[1]}, duplicated={counts[2]}, "
        f"stuck={counts[3]}, leaked={counts[4]}",
        flush=True,
    )
    return 1 if code or any(counts[1:]) or counts[0] != len(SCENARIOS) else 0


def _follow(proc: subprocess.Popen[str]) -> tuple[list[int], threading.Thread]:
    """Pass a lane's lines on as they come (in a thread: lanes run at once); its tally, filled
    in once the thread has read the lane's last line."""
    found: list[int] = [0, 0, 0, 0, 0]

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if m := _TALLY.match(line):
                found[:] = [int(g) for g in m.groups()]

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return found, thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir and logs")
    parser.add_argument(
        "--one-by-one", action="store_true", help="every scenario one after another, no lanes"
    )
    args = parser.parse_args(argv)
    if not args.only and not args.one_by_one:
        return _phases(args.keep)
    chosen = list(SCENARIOS) if not args.only else [k.strip() for k in args.only.split(",")]
    runnable = SCENARIOS
    unknown = [k for k in chosen if k not in runnable]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(runnable)}")

    work = Path(tempfile.mkdtemp(prefix="switchboard-faults-"))
    bench = Bench(work)
    total = Tally()
    failed = 0
    for key in chosen:
        started = time.perf_counter()
        try:
            with bench.scope():
                tally = runnable[key](bench)
                started_pids = [child.pid for child in bench.children]
            tally.leaked += leaked_processes(started_pids)
            outcome = "ok" if tally.clean else "FAILED"
        except Exception:
            tally = Tally(
                detail="could not run: " + traceback.format_exc().strip().splitlines()[-1]
            )
            print(traceback.format_exc(), file=sys.stderr)
            outcome = "ERROR"
            failed += 1
        total.add(tally)
        print(
            f"{key}: {outcome} in {time.perf_counter() - started:.1f} s; {tally.counts()}; "
            f"{tally.detail}",
            flush=True,
        )
    bench.stop_all()
    if args.keep:
        print(f"faults: scratch dir and logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"faults: {len(chosen)} scenarios, {total.counts()}", flush=True)
    return 1 if failed or not total.clean else 0


if __name__ == "__main__":
    sys.exit(main())
