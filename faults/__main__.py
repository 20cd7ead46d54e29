"""``python -m faults`` (``make faults``): every scenario, one line each, then the tally.

Each scenario starts the processes it needs (Tansu, Redis, the provider SIMULATOR, router,
workers, metrics), does its damage, checks every message it sent, and stops what it started.
The last line is ``faults: <n> scenarios, lost=<L>, duplicated=<D>, stuck=<S>, leaked=<K>``;
the command exits non-zero when any count is not 0 or a scenario could not run.

    python -m faults                 # every scenario
    python -m faults --only poison   # some (comma-separated keys)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir and logs")
    args = parser.parse_args(argv)
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
