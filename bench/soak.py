"""``python -m bench.soak`` (``make soak``): the real ``switchboard up`` under steady traffic for
a long while, and whether it still behaves at the end as it did at the start.

The embedded broker (Tansu) slows down as a partition fills with record batches, until it stops
serving fetches (docs/embedded-broker.md); every sync answer is a batch on the router's reply
topic. This run shows whether what the stack does about it holds: ``switchboard up`` starts as a user starts it
(a subprocess, a scratch ``SWITCHBOARD_DATA_DIR``, a free port, the provider simulator with
``--latency-scale``), and for ``--minutes``, after a 10 s warm-up at the same rates:

- sync: ``bench.loadgen`` in its own process, open loop at ``--rate`` requests/s to
  ``POST /v1/chat/completions`` (model ``fast``, a short prompt, timeout 10 s), logging every
  request so each window has its own percentiles;
- async: ``--jobs-per-s`` ChatRequests a second (each with its own request_id, long enough to be
  routed to the ``balanced`` tier) produced to the ingress topic in a burst every 10 s, their answers
  read from the results topic by a consumer group that commits once a second (the keeper compacts
  only what every group has committed);
- every 5 s: the broker's CPU and RSS (psutil, its pid from ``<data_dir>/run/stack.json``), the
  keeper's ``<data_dir>/run/keeper.json``, and what the whole machine used (a noisy neighbour on
  2 cores shows there rather than passing for our slowdown);
- before the load and after it (and after the jobs drained): 20 sequential requests, the
  "fresh request" probe.

Then it stops the stack with SIGTERM and checks every process it started is gone.

Pass criteria (``bench/soak_checks.py``), each printed with its measured values:

- ``sync``: every sync request (warm-up and probes included) is a 200 within 10 s, and every
  request the generator scheduled is in its log.
- ``jobs``: every job the broker took has exactly one answer (0 lost, 0 duplicated), none of them
  a ChatError, and the broker took every job produced.
- ``p99``: the p99 of the successful requests is taken per ~10-second slice of each window; the
  median of the last window's slices <= 1.5 x the median of the first window's. One slow slice
  (a pause of a second or two) does not decide it; latency that stays up does.
- ``broker_cpu``: mean broker CPU (% of one core) over the last window's samples <= 1.5 x the
  first window's mean + 5 percentage points.
- ``broker_rss``: broker RSS at the last sample of the load <= 1.5 x its RSS at the last sample
  of the first window + 50 MB.
- ``bounded``: ``keeper.json`` exists (no keeper: FAIL), is fresh (written in the last 30 s) at
  every sample from the load's start on, lists the results topic and a reply topic, and every
  ``batches_at_most`` it showed is <= ``--max-batches`` (5,000). And no growth: the largest
  ``batches_at_most`` of any partition, over the last window's samples, is <= its largest over
  the first half of the load plus one sampling step (the median rise between consecutive samples
  that rose), so a sawtooth caught a little later in its rise passes and a rising trend does not.
  A topic the keeper compacted before the last window, and seen to drop, is held to the higher
  of that and the keeper's compaction point (``COMPACT_AFTER``, 2,000 batches): the first half's
  samples may have caught its teeth lower than the last window's did. So the first half must hold a compaction of the busiest topics: in a shorter run their first
  peak comes late and fails as growth (the message says the run may be too short). A quieter
  topic that rises all through the run (it has not reached the keeper's compaction point, or
  cannot be compacted) fails only once it passes the bound or the busiest partitions' peaks; the
  report names each such topic with its rise per minute.
- ``fresh``: the probe's median after the load <= 1.5 x its median before it.
- ``stop``: SIGTERM stops ``switchboard up`` with exit code 0 and no process of it left running.

Windows: 5 minutes at each end for runs of 15 minutes or more. A shorter run compares its first
half with its last 20%: its first minute runs on empty partitions, faster than the steady state
the keeper holds them at (``windows`` in ``bench/soak_checks.py``).
Writes ``<out>/soak-<date>.md`` and ``.json``; exits 0 only when every criterion passed.

    python -m bench.soak                         # 30 minutes at 50 RPS + 5 jobs/s
    python -m bench.soak --minutes 3 --rate 50   # a short look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from aiokafka.errors import KafkaError

from bench.common import RESULTS_DIR, ROOT, Bench, base_env, machine_info, python
from bench.soak_checks import (
    DEFAULT_MAX_BATCHES,
    Criterion,
    Request,
    Sample,
    Windows,
    bounded_criterion,
    cpu_criterion,
    fresh_criterion,
    jobs_criterion,
    p99_criterion,
    per_minute,
    rss_criterion,
    sync_criterion,
    windows,
)
from bench.soak_report import markdown
from bench.soak_traffic import Answers, Jobs, LogTail, Look, Sampler, produce_jobs
from schemas.topics import Topics
from switchboard.embedded import Child, free_port, wait_for
from switchboard.up import PROVIDER_KEYS

READY_S = 240.0
TIMEOUT_S = 10.0
PROBES = 20
PROBE_GIVE_UP = 3  # failures in a row: the stack is not answering, the probe has its answer
SAMPLE_S = 5.0
DRAIN_S = 120.0  # how long jobs may still be answered after the load
QUIET_S = 5.0  # then how long to go on reading, so late duplicates are counted
STOP_S = 120.0
PROGRESS_S = 60.0
# Other programs using this many cores on average make the run's figures suspect (2 cores).
NOISY_CORES = 0.25
SYNC_BODY = {
    "model": "fast",
    "messages": [{"role": "user", "content": "Where is my parcel? Order 1234."}],
    "metadata": {"tenant": "soak"},
}
_READY = re.compile(r"^switchboard ready (http://\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class SoakParams:
    minutes: float = 30.0
    rate: float = 50.0
    jobs_per_s: float = 5.0
    latency_scale: float = 1.0
    max_batches: int = DEFAULT_MAX_BATCHES
    warmup_s: float = 10.0
    stream: bool = False  # the sync requests streamed (server-sent events)

    @property
    def duration_s(self) -> float:
        return self.minutes * 60

    @property
    def warmup_requests(self) -> int:
        return round(self.rate * self.warmup_s)  # as bench.loadgen counts them

    @property
    def expected_requests(self) -> int:
        return self.warmup_requests + round(self.rate * self.duration_s)


@dataclass
class SoakReport:
    params: SoakParams
    criteria: list[Criterion]
    data: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    def criterion(self, key: str) -> Criterion:
        return next(c for c in self.criteria if c.key == key)


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Up:
    child: Child
    data_dir: Path
    base_url: str
    api_key: str
    pids: dict[str, int]
    started: dict[str, float]  # each one's start time: a pid reused later is not ours

    @property
    def keeper_path(self) -> Path:
        return self.data_dir / "run" / "keeper.json"


def _spawn(bench: Bench, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Child:
    # From the repository: `up` finds config/simulated.yaml, and `-m bench...` its package, there.
    with contextlib.chdir(ROOT):
        return bench.adopt(Child(name, argv, env, log_dir))


def start_up(bench: Bench, work: Path, params: SoakParams) -> Up:
    data_dir = work / "sb"
    api_key = "sk-soak-" + uuid.uuid4().hex
    env = base_env(
        SWITCHBOARD_DATA_DIR=str(data_dir),
        SWITCHBOARD_PORT=str(free_port()),
        SWITCHBOARD_API_KEY=api_key,
        SWITCHBOARD_SIMULATOR_LATENCY_SCALE=str(params.latency_scale),
    )
    for key in PROVIDER_KEYS:  # the simulator, whatever keys this shell holds
        env.pop(key, None)
    child = _spawn(bench, "switchboard-up", [python(), "-m", "switchboard.cli", "up"], env, work)
    found: list[str] = []

    def ready() -> bool:
        found[:] = _READY.findall(child.log_path.read_text(errors="replace"))
        return bool(found)

    try:
        wait_for("switchboard up", ready, READY_S, child.alive)
    except Exception as exc:
        raise RuntimeError(f"{exc}; its output:\n{child.tail(40)}") from exc
    state = json.loads((data_dir / "run" / "stack.json").read_text())
    pids = {name: int(pid) for name, pid in state["pids"].items()}
    started = {name: psutil.Process(pid).create_time() for name, pid in pids.items()}
    return Up(child, data_dir, found[0], api_key, pids, started)


def stop_up(bench: Bench, up: Up) -> tuple[int, list[str]]:
    """SIGTERM ``switchboard up``; its exit code and the names of its processes still running
    30 s after it exited (killed then: they are this run's)."""
    code = up.child.stop(timeout_s=STOP_S)
    bench.stop(up.child)
    deadline = time.monotonic() + 30

    def running() -> dict[str, psutil.Process]:
        return {n: p for n, pid in up.pids.items() if (p := _ours(pid, up.started[n]))}

    while (left := running()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in left.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return code, sorted(left)


def _ours(pid: int, started: float) -> psutil.Process | None:
    """The process ``pid`` if it still runs and is the one that started at ``started``."""
    try:
        proc = psutil.Process(pid)
        if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def probe(up: Up) -> list[tuple[float, str | None]]:
    """``PROBES`` sequential requests: (ms, error or None) each."""
    out: list[tuple[float, str | None]] = []
    in_a_row = 0
    with httpx.Client(timeout=TIMEOUT_S) as client:
        for _ in range(PROBES):
            started = time.perf_counter()
            error: str | None = None
            try:
                r = client.post(
                    f"{up.base_url}/v1/chat/completions",
                    json=SYNC_BODY,
                    headers={"authorization": f"Bearer {up.api_key}"},
                )
                error = None if r.status_code == 200 else f"http_{r.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            out.append(((time.perf_counter() - started) * 1000, error))
            in_a_row = in_a_row + 1 if error else 0
            if in_a_row >= PROBE_GIVE_UP:
                break
    return out


# --- the load ------------------------------------------------------------------------------------


def start_loadgen(bench: Bench, up: Up, params: SoakParams, work: Path) -> tuple[Child, Path]:
    body, log = work / "sync-body.json", work / "requests.jsonl"
    streamed = {"stream": True, "stream_options": {"include_usage": True}}
    body.write_text(json.dumps({**SYNC_BODY, **streamed} if params.stream else SYNC_BODY))
    argv = [
        python(),
        "-m",
        "bench.loadgen",
        "--url",
        f"{up.base_url}/v1/chat/completions",
        "--rate",
        str(params.rate),
        "--duration",
        str(params.duration_s),
        "--warmup",
        str(params.warmup_s),
        "--timeout",
        str(TIMEOUT_S),
        "--body-file",
        str(body),
        "--header",
        f"authorization: Bearer {up.api_key}",
        "--log",
        str(log),
        *(["--stream"] if params.stream else []),
    ]
    return _spawn(bench, "loadgen", argv, base_env(), work), log


@dataclass
class LoadRun:
    jobs: Jobs
    looks: list[Look]
    lines: list[dict[str, Any]]
    loadgen: dict[str, Any]
    started_wall: float
    aborted: str = ""


async def load(
    bench: Bench, up: Up, params: SoakParams, work: Path, say: Callable[[str], None]
) -> LoadRun:
    topics = Topics()
    bootstrap = _bootstrap(up)
    jobs = Jobs(uuid.uuid4().hex[:8])
    answers = Answers(bootstrap, topics.results, jobs)
    await answers.start()
    loadgen, log_path = start_loadgen(bench, up, params, work)
    started = time.time()
    sampler = Sampler({**up.pids, "up": up.child.pid}, [loadgen.pid, os.getpid()], up.keeper_path)
    tail = LogTail(log_path)
    until = started + params.warmup_s + params.duration_s
    producing = asyncio.create_task(
        produce_jobs(bootstrap, topics.ingress, jobs, params.jobs_per_s, until)
    )
    aborted = ""
    next_look, next_say = time.monotonic() + SAMPLE_S, time.monotonic() + PROGRESS_S
    try:
        while loadgen.alive() or not producing.done():
            if not up.child.alive():
                aborted = f"switchboard up exited ({up.child.proc.returncode}) during the load"
                break
            await answers.poll()
            if time.monotonic() >= next_look:
                sampler.look()
                next_look += SAMPLE_S
            if time.monotonic() >= next_say:
                tail.read()
                say(_progress(time.time() - started - params.warmup_s, tail, jobs, sampler))
                next_say += PROGRESS_S
        if producing.done() and (failed := producing.exception()) is not None:
            jobs.failure = repr(failed)  # a criterion fails on it; raising would lose the report
        deadline = time.monotonic() + DRAIN_S
        while jobs.unanswered and time.monotonic() < deadline and not aborted:
            await answers.poll()
            if time.monotonic() >= next_look:
                sampler.look()
                next_look += SAMPLE_S
        quiet = time.monotonic() + QUIET_S
        while time.monotonic() < quiet:
            await answers.poll()
        sampler.look()
    finally:
        producing.cancel()
        with contextlib.suppress(asyncio.CancelledError, KafkaError):
            await producing
        await answers.stop()
        bench.stop(loadgen)
    tail.read()
    summary = _last_json(loadgen.log_path)
    return LoadRun(jobs, sampler.looks, tail.lines, summary, started, aborted)


def _bootstrap(up: Up) -> str:
    """The broker's address, from its command line (``--listener-url tcp://host:port``)."""
    argv = psutil.Process(up.pids["broker"]).cmdline()
    url = argv[argv.index("--listener-url") + 1]
    return url.removeprefix("tcp://")


def _last_json(path: Path) -> dict[str, Any]:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return {}


def _progress(t: float, tail: LogTail, jobs: Jobs, sampler: Sampler) -> str:
    recent = [x for x in tail.lines[-5000:] if x["due"] >= time.time() - 70]
    errors = sum(1 for x in tail.lines if x["error"] is not None)
    ok = sorted(x["latency_ms"] for x in recent if x["error"] is None)
    p99 = f"{ok[int(len(ok) * 0.99)]:.0f} ms" if ok else "-"
    look = sampler.looks[-1] if sampler.looks else None
    broker = (
        f"broker {look.cpu_pct.get('broker', 0):.0f}% CPU, {look.rss_mb.get('broker', 0):.0f} MB"
        if look
        else ""
    )
    keeper = "keeper.json: " + (
        f"max {look.keeper.peak:,} batches ({look.keeper.peak_at})"
        if look and look.keeper.by_family
        else (look.keeper.status if look else "-")
    )
    return (
        f"soak: {t / 60:.1f} min: {len(tail.lines):,} requests, {errors} errors, recent p99 "
        f"{p99}; jobs {jobs.produced:,} produced, {jobs.produced - jobs.unanswered:,} answered; "
        f"{broker}; {keeper}"
    )


# --- the whole run -----------------------------------------------------------------------------


def run_soak(params: SoakParams, bench: Bench, say: Callable[[str], None] = print) -> SoakReport:
    """Start the stack, load it, stop it, judge it. Writes nothing outside ``bench.work_dir``."""
    work = bench.work_dir / f"soak-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    up = start_up(bench, work, params)
    say(f"soak: switchboard up ready at {up.base_url} ({len(up.pids)} processes)")
    before = probe(up)
    with _kafka_log(work / "kafka-clients.log"):
        run = asyncio.run(load(bench, up, params, work, say))
    after = probe(up) if not run.aborted else []
    code, left = stop_up(bench, up)
    report = judge(params, up, run, before, after, code, left)
    write_results(report, machine_info(), work, "soak")  # beside the logs, for --keep
    return report


@contextlib.contextmanager
def _kafka_log(path: Path) -> Iterator[None]:
    """This process's Kafka clients log to ``path``: once the stack is gone, their retries would
    flood the console."""
    logger = logging.getLogger("aiokafka")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved
        handler.close()


def judge(
    params: SoakParams,
    up: Up,
    run: LoadRun,
    before: list[tuple[float, str | None]],
    after: list[tuple[float, str | None]],
    exit_code: int,
    left: list[str],
) -> SoakReport:
    lines = run.lines
    first_due = min((x["due"] for x in lines), default=run.started_wall)
    start = first_due + params.warmup_requests / params.rate  # the measured load's start
    requests = [Request(x["due"] - start, x["latency_ms"], x["error"], x["warmup"]) for x in lines]
    samples = [
        Sample(
            look.wall - start,
            look.cpu_pct.get("broker"),
            look.rss_mb.get("broker"),
            look.keeper,
            look.others_cores,
        )
        for look in run.looks
    ]
    w = windows(params.duration_s)
    probes = [e for _, e in before + after]
    jobs = run.jobs
    criteria = [
        sync_criterion(requests, params.expected_requests, probes),
        jobs_criterion(jobs.produced, jobs.unsent, jobs.answers, jobs.error_codes, jobs.failure),
        p99_criterion(requests, w),
        cpu_criterion(samples, w),
        rss_criterion(samples, w),
        bounded_criterion(samples, w, params.max_batches, str(up.keeper_path), Topics()),
        fresh_criterion(
            [ms for ms, e in before if e is None], [ms for ms, e in after if e is None]
        ),
        Criterion(
            "stop",
            exit_code == 0 and not left and not run.aborted,
            (run.aborted + "; " if run.aborted else "")
            + f"switchboard up exited {exit_code} on SIGTERM; "
            + (f"still running after it: {', '.join(left)}" if left else "no process left"),
            {"exit_code": exit_code, "left": left, "aborted": run.aborted},
        ),
    ]
    data = {
        "windows": asdict(w),
        "requests_logged": len(requests),
        "loadgen": run.loadgen,
        "per_minute": per_minute(requests, samples, params.duration_s),
        "probe_ms": {
            "before": [round(ms, 1) for ms, _ in before],
            "after": [round(ms, 1) for ms, _ in after],
        },
        "jobs": {
            "produced": jobs.produced,
            "results": jobs.results,
            "error_answers": dict(jobs.error_codes),
            "strays": jobs.strays,
            "unreadable": jobs.unreadable,
            "commit_failures": jobs.commit_failures,
        },
        "others_cores": _others(samples, w),
        "samples": _sample_series(samples, run.looks),
        "processes": _processes(run.looks, w, start),
        "pids": up.pids,
    }
    return SoakReport(params, criteria, data)


def _others(samples: list[Sample], w: Windows) -> dict[str, Any]:
    """What programs outside the run used during the load, in cores: a noisy neighbour."""
    used = [
        s.others_cores for s in samples if s.others_cores is not None and 0 <= s.t <= w.duration_s
    ]
    mean = round(sum(used) / len(used), 2) if used else None
    return {
        "mean": mean,
        "max": max(used, default=None),
        "noisy": mean is not None and mean > NOISY_CORES,
    }


def _sample_series(samples: list[Sample], looks: list[Look]) -> list[dict[str, Any]]:
    return [
        {
            "t": round(s.t, 1),
            "broker_cpu_pct": s.broker_cpu_pct,
            "broker_rss_mb": s.broker_rss_mb,
            "others_cores": s.others_cores,
            "keeper": s.keeper.status,
            "keeper_age_s": s.keeper.age_s,
            "max_batches": s.keeper.peak if s.keeper.by_family else None,
            "max_at": s.keeper.peak_at or None,
        }
        for s in samples
    ]


def _processes(looks: list[Look], w: Windows, start: float) -> dict[str, dict[str, Any]]:
    """Per process: mean CPU % in the first and last windows, RSS at the first and last look."""
    out: dict[str, dict[str, Any]] = {}
    names = sorted({n for look in looks for n in look.rss_mb})
    for name in names:

        def mean(span: tuple[float, float], name: str = name) -> float | None:
            v = [
                look.cpu_pct[name]
                for look in looks
                if name in look.cpu_pct and span[0] <= look.wall - start <= span[1]
            ]
            return round(sum(v) / len(v), 1) if v else None

        rss = [look.rss_mb[name] for look in looks if name in look.rss_mb]
        out[name] = {
            "cpu_pct_first": mean(w.first),
            "cpu_pct_last": mean(w.last),
            "rss_mb_first": rss[0],
            "rss_mb_last": rss[-1],
        }
    return out


def write_results(
    report: SoakReport, machine: dict[str, Any], out: Path, stem: str
) -> tuple[str, Path, Path]:
    """``<out>/<stem>.md`` and ``.json``; the markdown's text and both paths."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report, machine)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(text)
    record = {
        "machine": machine,
        "params": asdict(report.params),
        "passed": report.passed,
        "criteria": [asdict(c) for c in report.criteria],
        **report.data,
    }
    js.write_text(json.dumps(record, indent=2) + "\n")
    return text, md, js


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="measured load (30)")
    parser.add_argument("--rate", type=float, default=50.0, help="sync requests/s (50)")
    parser.add_argument("--jobs-per-s", type=float, default=5.0, help="async jobs/s (5)")
    parser.add_argument("--latency-scale", type=float, default=1.0, help="simulator delays (1.0)")
    parser.add_argument(
        "--max-batches", type=int, default=DEFAULT_MAX_BATCHES, help="the bound (5000)"
    )
    parser.add_argument(
        "--stream", action="store_true", help="stream the sync requests (stream: true)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where results go")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir and logs")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.jobs_per_s < 0:
        parser.error("--minutes and --rate must be positive, --jobs-per-s not negative")
    params = SoakParams(
        args.minutes,
        args.rate,
        args.jobs_per_s,
        args.latency_scale,
        args.max_batches,
        stream=args.stream,
    )
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="switchboard-soak-"))
    bench = Bench(work)
    try:
        report = run_soak(params, bench)
    finally:
        bench.stop_all()
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    stem = f"soak-stream-{day}" if args.stream else f"soak-{day}"
    text, md, js = write_results(report, machine, args.out, stem)
    print(text)
    print(f"soak: {'PASSED' if report.passed else 'FAILED'}; wrote {md} and {js}")
    if args.keep:
        print(f"soak: scratch dir and logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
