"""Open-loop HTTP load generator: a fixed arrival rate, latency measured from the schedule.

``python -m bench.loadgen --url URL --rate R --duration S --body-file F [--header 'K: V']...``
POSTs the body ``R * S`` times and prints one JSON line (see ``summarise``). With ``--log FILE``
it also writes one JSON line per request as each one ends (see ``log_line``), so a long run can
be cut into time windows, and watched while it runs.

Open loop, so slow answers cannot hide themselves (no coordinated omission): request ``i`` is due
at ``t0 + i / rate`` whatever happened to earlier ones, each runs in its own task, the connection
pool has no limit, and latency runs from the *due* time to the last byte of the answer, so any
delay in the generator itself counts against the target rather than vanishing. The generator's
own lag (start of a request minus its due time) and its achieved send rate are reported, so a
generator that cannot keep up is visible in the figures instead of silently lowering the load.

A request that raises, answers anything but 200, or is not done ``timeout`` seconds after its due
time is an error. Latency percentiles cover the successful requests; errors are counted by kind.
Run it as its own process so its event loop shares nothing with whoever orchestrates the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from bench.common import percentile

DEFAULT_TIMEOUT_S = 10.0
# The first request is due this long after start, so scheduling begins on a quiet loop.
_LEAD_S = 0.02


@dataclass(frozen=True)
class LoadSpec:
    """One open-loop run: where, how fast, for how long, with what request."""

    url: str
    rate: float
    duration_s: float
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    warmup_s: float = 0.0

    @property
    def measured(self) -> int:
        return round(self.rate * self.duration_s)

    @property
    def warmup(self) -> int:
        return round(self.rate * self.warmup_s)


@dataclass(frozen=True)
class Outcome:
    """One request, its times in ``time.perf_counter()`` seconds.

    Not the loop's clock: uvloop's ``loop.time()`` ticks in whole milliseconds, too coarse for
    overheads of a few milliseconds.
    """

    due: float
    started: float
    finished: float
    error: str | None  # None: a 200 whose body was read in full

    @property
    def latency_s(self) -> float:
        return self.finished - self.due

    @property
    def lag_s(self) -> float:
        return self.started - self.due


def log_line(outcome: Outcome, wall_offset_s: float, warmup: bool) -> str:
    """One request of ``--log``: ``due`` in Unix seconds (``wall_offset_s`` turns the
    ``perf_counter`` schedule into wall-clock time, so other processes' samples line up with it),
    latency in ms, ``error`` as in ``Outcome`` (null: a 200), and whether it was a warm-up one."""
    return json.dumps(
        {
            "due": round(outcome.due + wall_offset_s, 4),
            "latency_ms": round(outcome.latency_s * 1000, 3),
            "error": outcome.error,
            "warmup": warmup,
        }
    )


def due_times(t0: float, rate: float, count: int) -> list[float]:
    """When each request is due: evenly spaced, fixed before the first one is sent."""
    return [t0 + i / rate for i in range(count)]


def _ms(value_s: float) -> float | None:
    """Milliseconds, rounded; ``None`` instead of NaN so the JSON stays valid."""
    return None if math.isnan(value_s) else round(value_s * 1000, 3)


def summarise(outcomes: Sequence[Outcome], rate: float) -> dict[str, Any]:
    """What one run measured: counts, latency percentiles, and how well the generator kept up.

    ``achieved_rps`` is requests started per second, from the first due time to the last actual
    start plus one interval: exactly ``rate`` when every request left on time, lower when the
    generator fell behind.
    """
    ok = sorted(o.latency_s for o in outcomes if o.error is None)
    lags = sorted(o.lag_s for o in outcomes)
    kinds = Counter(o.error for o in outcomes if o.error is not None)
    sent = len(outcomes)
    errors = sum(kinds.values())
    achieved = math.nan
    if outcomes:
        span = max(o.started for o in outcomes) - min(o.due for o in outcomes) + 1 / rate
        achieved = sent / span
    return {
        "rate": rate,
        "sent": sent,
        "ok": len(ok),
        "errors": errors,
        "error_rate": round(errors / sent, 5) if sent else None,
        "error_kinds": dict(sorted(kinds.items())),
        "p50_ms": _ms(percentile(ok, 50)),
        "p95_ms": _ms(percentile(ok, 95)),
        "p99_ms": _ms(percentile(ok, 99)),
        "max_ms": _ms(ok[-1] if ok else math.nan),
        "achieved_rps": None if math.isnan(achieved) else round(achieved, 2),
        "lag_p99_ms": _ms(percentile(lags, 99)),
        "lag_max_ms": _ms(lags[-1] if lags else math.nan),
    }


async def _one(session: aiohttp.ClientSession, spec: LoadSpec, due: float) -> Outcome:
    started = time.perf_counter()
    error: str | None = None
    try:
        async with asyncio.timeout(due + spec.timeout_s - started):
            async with session.post(spec.url, data=spec.body, headers=dict(spec.headers)) as resp:
                await resp.read()
                if resp.status != 200:
                    error = f"http_{resp.status}"
    except TimeoutError:
        error = "timeout"
    except (aiohttp.ClientError, OSError) as exc:  # refused, reset, disconnected, bad answer
        error = type(exc).__name__
    return Outcome(due, started, time.perf_counter(), error)


async def run_load(spec: LoadSpec, log_path: Path | None = None) -> dict[str, Any]:
    """Send ``spec``'s warm-up then measured requests on schedule; summarise the measured ones.

    Warm-up requests open the pool's connections at this rate and are not counted. Every task is
    awaited, so when this returns no request of this run is still in flight. With ``log_path``
    every request, warm-up ones included, gets a ``log_line`` there as soon as it ends.
    """
    total = spec.warmup + spec.measured
    wall_offset = time.time() - time.perf_counter()
    log = log_path.open("w", buffering=1) if log_path is not None else None
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
    try:
        # No client timeout: each request's deadline runs from its due time (asyncio.timeout_at).
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        ) as session:
            tasks: list[asyncio.Task[Outcome]] = []
            for i, due in enumerate(due_times(time.perf_counter() + _LEAD_S, spec.rate, total)):
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(_one(session, spec, due))
                if log is not None:
                    task.add_done_callback(_logger(log, wall_offset, warmup=i < spec.warmup))
                tasks.append(task)
            outcomes = await asyncio.gather(*tasks)
    finally:
        if log is not None:
            log.close()
    result = summarise(outcomes[spec.warmup :], spec.rate)
    result.update(
        url=spec.url,
        duration_s=spec.duration_s,
        warmup_s=spec.warmup_s,
        timeout_s=spec.timeout_s,
    )
    return result


def _logger(
    log: TextIO, wall_offset_s: float, warmup: bool
) -> Callable[[asyncio.Task[Outcome]], None]:
    def write(task: asyncio.Task[Outcome]) -> None:
        if task.cancelled() or task.exception() is not None:
            return  # the run itself fails on it, in gather
        log.write(log_line(task.result(), wall_offset_s, warmup) + "\n")

    return write


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds first")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--header", type=parse_header, action="append", default=[])
    parser.add_argument("--log", type=Path, help="write one JSON line per request here")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    headers = {"content-type": "application/json", **dict(args.header)}
    spec = LoadSpec(
        url=args.url,
        rate=args.rate,
        duration_s=args.duration,
        body=args.body_file.read_bytes(),
        headers=headers,
        timeout_s=args.timeout,
        warmup_s=args.warmup,
    )
    try:
        import uvloop  # a cheaper loop leaves more headroom before the generator lags
    except ImportError:
        result, loop_name = asyncio.run(run_load(spec, args.log)), "asyncio"
    else:
        result, loop_name = uvloop.run(run_load(spec, args.log)), "uvloop"
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(loop=loop_name, generator_cpu_s=round(usage.ru_utime + usage.ru_stime, 3))
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
