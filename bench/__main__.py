"""``python -m bench`` (``make bench``): every scenario, then the report and latest.json.

Writes ``bench/results/<date>.md`` (the human report) and ``bench/results/latest.json``. Each
scenario starts the processes it measures and stops them before the next begins, so scenarios
never share a core with each other's leftovers. A scenario that fails is reported as failed,
the others still run, and the command exits non-zero.

    python -m bench                 # the full suite (about 20 minutes on 2 cores)
    python -m bench --only worker   # some scenarios (comma-separated keys)
    python -m bench --quick --out /tmp/b   # tiny sizes: checks the mechanics, not a result
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    decisions,
    ingest,
    jobs,
    redis_sizing,
    report,
    semantic,
    startup,
    stream,
    sync,
    sync_light,
    worker,
)
from bench.common import RESULTS_DIR, Bench, Section, machine_info
from bench.targets import evaluate, targets_markdown

SCENARIOS: dict[str, Callable[[Bench], Section]] = {
    "startup": startup.run,
    "sync": sync.run,
    "sync_light": sync_light.run,
    "stream": stream.run,
    "worker": worker.run,
    "router": decisions.run,
    "semantic": semantic.run,
    "metrics": ingest.run,
    "jobs": jobs.run,
    "redis": redis_sizing.run,
    "report": report.run,
}


def summary(sections: dict[str, Section]) -> dict[str, Any]:
    """latest.json: each scenario's data, plus the headline fields under their agreed names."""
    out: dict[str, Any] = {key: s.data for key, s in sections.items()}
    if "sync" in sections:
        out["sync"] = {**sections["sync"].data["rates"], "detail": sections["sync"].data}
    rss: dict[str, float] = {}
    if "sync" in sections:
        rss["router"] = sections["sync"].data["rss_mb"]["router"]
    elif "router" in sections:
        rss["router"] = sections["router"].data["rss_mb"]
    if "worker" in sections:
        rss["worker"] = sections["worker"].data["rss_mb_at_1000_in_flight"]
    if "metrics" in sections:
        rss["metrics"] = sections["metrics"].data["rss_mb"]
    out["rss_mb"] = rss
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where results go")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir and logs")
    args = parser.parse_args(argv)
    chosen = list(SCENARIOS) if not args.only else [k.strip() for k in args.only.split(",")]
    unknown = [k for k in chosen if k not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")

    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    bench = Bench(work, quick=args.quick)
    sections: dict[str, Section] = {}
    failures: dict[str, str] = {}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for key in chosen:
            print(f"bench: {key} ...", flush=True)
            t0 = time.perf_counter()
            try:
                sections[key] = SCENARIOS[key](bench)
            except Exception:
                failures[key] = traceback.format_exc()
                print(f"bench: {key} FAILED\n{failures[key]}", file=sys.stderr, flush=True)
            finally:
                bench.stop_all()
                timings[key] = round(time.perf_counter() - t0, 1)
            print(f"bench: {key} done in {timings[key]} s", flush=True)
    finally:
        bench.stop_all()
    total = round(time.perf_counter() - started, 1)

    data = summary(sections)
    verdicts = evaluate(data)
    latest = {
        "machine": machine,
        "quick": args.quick,
        "duration_s": total,
        "scenario_s": timings,
        **data,
        "targets": verdicts,
        "failed": {k: v.strip().splitlines()[-1] for k, v in failures.items()},
    }
    command = "make bench" if not args.only else f"python -m bench --only {','.join(chosen)}"
    report = render(machine, sections, verdicts, failures, timings, total, args.quick, command)
    args.out.mkdir(parents=True, exist_ok=True)
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    (args.out / f"{day}.md").write_text(report)
    (args.out / "latest.json").write_text(json.dumps(latest, indent=2, default=_json) + "\n")
    print(report)
    print(f"bench: wrote {args.out / f'{day}.md'} and {args.out / 'latest.json'} in {total} s")
    if args.keep:
        print(f"bench: scratch dir and logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def _json(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def render(
    machine: dict[str, Any],
    sections: dict[str, Section],
    verdicts: list[dict[str, Any]],
    failures: dict[str, str],
    timings: dict[str, float],
    total: float,
    quick: bool,
    command: str = "make bench",
) -> str:
    head = [
        f"# Switchboard benchmark, {machine['date']}",
        "",
        f"Command: `{command}`"
        + (" (**--quick: tiny sizes, not a measurement**)" if quick else "")
        + f". Took {total} s ("
        + ", ".join(f"{k} {v} s" for k, v in timings.items())
        + ").",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} logical cores, "
        f"{machine['memory_gib']} GiB, Python {machine['python']}, {machine['os']}, "
        f"host {machine['host']}, commit {machine['commit'] or 'unknown'}"
        + (
            f" with uncommitted changes to {', '.join(machine['uncommitted'])}"
            if machine.get("uncommitted")
            else ""
        )
        + ". Every process "
        "(load generator, broker, Redis, simulator, our services, the LiteLLM proxy) shares "
        "these cores. Models are served by the provider SIMULATOR, not real providers; the "
        "broker is Tansu (in-memory), ClickHouse is chDB.",
        "",
        targets_markdown(verdicts),
    ]
    body = [s.markdown for s in sections.values()]
    failed = [f"## {k}: FAILED\n\n```\n{v.strip()}\n```" for k, v in failures.items()]
    return "\n\n".join(["\n".join(head), *body, *failed]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
