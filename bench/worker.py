"""Scenario 2: one worker process's throughput and CPU per call, beside bare litellm.

Both run against the same simulator model answering after 500 ms (no jitter). The worker gets
its tier topic pre-filled by a burst of routed requests and is timed from the first send to the
last result on the results topic; its CPU is the kernel's count for the process over that span.
The baseline is ``bench.bare_litellm``: plain ``litellm.acompletion`` from a bare script, same
model, same concurrency. A second tier holds its calls 8 s at the simulator, so the worker's RSS
is read with 1,000 calls in flight.

Experiments: the same worker's CPU per call outside any experiment and in a canary at 50 %
(alternating bursts); and a shadow's cost at shares 0, 10, 50 and 100 %: a third tier's worker
and the shadow worker, their CPU per request of the tier over a burst at each share, every
mirror compared (the candidate is the same simulated model under another label).
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
import uuid
from typing import Any

import httpx

from bench.common import (
    Bench,
    ProcSampler,
    Section,
    TopicCounter,
    produce_all,
    python,
    start_stack,
    tier_spec,
    write_config,
)
from schemas.topics import Topics
from schemas.v1 import ChatRequest, ExperimentTag, RoutedRequest

MODEL = "bench-500ms"
HOLD_MODEL = "bench-hold"
PROFILES = {
    MODEL: {"ttft_s": 0.5, "tokens_per_s": math.inf, "output_tokens": 24, "jitter": 0.0},
    HOLD_MODEL: {"ttft_s": 8.0, "tokens_per_s": math.inf, "output_tokens": 24, "jitter": 0.0},
}
CONCURRENCY = 1000
IN_FLIGHT = 1000


EXPERIMENT = "bench-canary"
SHADOW = "bench-shadow"
SHADOW_SHARES = (0, 10, 50, 100)


def routed(
    tier: str, topics: Topics, i: int, canary: bool = False, shadow_pct: int | None = None
) -> tuple[bytes, bytes]:
    """A routed request; with ``canary``, assigned in the tier's experiment at 50 %, every other
    one to the candidate (the same simulated model under another label); with ``shadow_pct``,
    ``shadow_pct`` of every 100 mirrored by the tier's shadow experiment."""
    request = ChatRequest.model_validate(
        {
            "model": "auto",
            "request_id": f"bench-{uuid.uuid4().hex}",
            "messages": [{"role": "user", "content": f"Ticket {i}: my parcel has not arrived."}],
        }
    )
    tag = None
    if canary:
        variant = "candidate" if i % 2 else "baseline"
        tag = ExperimentTag(name=EXPERIMENT, variant=variant, share_pct=50.0)
    elif shadow_pct is not None and i % 100 < shadow_pct:
        tag = ExperimentTag(name=SHADOW, variant="baseline", share_pct=float(shadow_pct))
    message = RoutedRequest(
        request=request,
        tier=tier,
        rule="default",
        config_hash="bench",
        reply_to=topics.results,
        experiment=tag,
    )
    return request.request_id.encode(), message.model_dump_json().encode()


async def _burst(
    bootstrap: str,
    topics: Topics,
    tier: str,
    count: int,
    timeout_s: float,
    canary: bool = False,
) -> tuple[float, bool]:
    """Send ``count`` routed requests; seconds from the first send to the last result."""
    messages = [routed(tier, topics, i, canary) for i in range(count)]
    return await _send(bootstrap, topics, tier, messages, timeout_s)


async def _send(
    bootstrap: str,
    topics: Topics,
    tier: str,
    messages: list[tuple[bytes, bytes]],
    timeout_s: float,
) -> tuple[float, bool]:
    """Send the messages; seconds from the first send to the last result.

    Done when the result of each of them was read (the results topic also holds earlier
    bursts' results, which a reader from its start meets first)."""
    counter = TopicCounter(bootstrap, topics.results)
    await counter.start()
    try:
        keys = {key for key, _ in messages}
        start = time.perf_counter()
        await produce_all(bootstrap, topics.tier(tier), messages)
        done = await counter.wait_for_keys(keys, timeout_s)
        last = max(counter.first_seen[k] for k in keys if k in counter.first_seen)
        return last - start, done
    finally:
        await counter.stop()


class Comparisons(TopicCounter):
    """The shadow comparisons topic: each key's outcome too."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(bootstrap, topic)
        self.outcomes: dict[bytes, str] = {}
        self.reasons: dict[bytes, str] = {}

    def first(self, key: bytes, value: bytes) -> None:
        comparison = json.loads(value)
        self.outcomes[key] = comparison["outcome"]
        self.reasons[key] = comparison["reason"]


def _shadow_cost(
    bootstrap: str, topics: Topics, worker: int, shadow: int, calls: int, quick: bool
) -> dict[str, Any]:
    """At each share: CPU of the mirror tier's worker and of the shadow worker per request of
    the tier, from the burst's first send until its last result and its last comparison."""

    async def one(share: int) -> dict[str, Any]:
        comparisons = Comparisons(bootstrap, topics.shadow_comparisons)
        await comparisons.start()
        try:
            messages = [routed("mirror", topics, i, shadow_pct=share) for i in range(calls)]
            mirrored = {key for i, (key, _) in enumerate(messages) if i % 100 < share}
            worker_cpu = ProcSampler([worker]).start()
            shadow_cpu = ProcSampler([shadow]).start()
            _, done = await _send(bootstrap, topics, "mirror", messages, 300)
            seen = await comparisons.wait_for_keys(mirrored, 300)
            w, sh = worker_cpu.stop().cpu_s, shadow_cpu.stop().cpu_s
            if not (done and seen):
                raise RuntimeError(f"a shadow-cost burst at {share} % was not answered in full")
            outcomes: dict[str, int] = {}
            reasons: dict[str, int] = {}  # of those not compared, by their first 100 characters
            for key in mirrored:
                outcome = comparisons.outcomes[key]
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome != "compared":
                    reason = comparisons.reasons[key][:100]
                    reasons[reason] = reasons.get(reason, 0) + 1
            return {
                "share_pct": share,
                "mirrored": len(mirrored),
                "outcomes": outcomes,
                "not_compared": reasons,
                "worker_cpu_ms_per_request": round(w / calls * 1000, 3),
                "shadow_cpu_ms_per_request": round(sh / calls * 1000, 3),
                "total_cpu_ms_per_request": round((w + sh) / calls * 1000, 3),
            }
        finally:
            await comparisons.stop()

    order: tuple[int, ...] = SHADOW_SHARES
    if not quick:  # a quick run's figures mean nothing: one pass shows the mechanics
        asyncio.run(one(SHADOW_SHARES[-1]))  # not counted: both workers' connection pools grow
        # each share twice, the second pass in reverse order, so a drift of the machine evens out
        order = (*SHADOW_SHARES, *SHADOW_SHARES[::-1])
    passes = [asyncio.run(one(share)) for share in order]
    rows = []
    for share in SHADOW_SHARES:
        runs = [r for r in passes if r["share_pct"] == share]
        row = {**runs[0], "outcomes": {}, "not_compared": {}}
        for key in ("outcomes", "not_compared"):
            for r in runs:
                for name, n in r[key].items():
                    row[key][name] = row[key].get(name, 0) + n
        row["mirrored"] = sum(r["mirrored"] for r in runs)
        for key in ("worker_cpu_ms_per_request", "shadow_cpu_ms_per_request",
                    "total_cpu_ms_per_request"):  # fmt: skip
            row[key] = round(sum(r[key] for r in runs) / len(runs), 3)
        rows.append(row)
    base = rows[0]["total_cpu_ms_per_request"]
    for row in rows[1:]:
        extra = row["total_cpu_ms_per_request"] - base
        row["extra_cpu_ms_per_request"] = round(extra, 3)
        row["extra_cpu_ms_per_mirror"] = round(extra / (row["share_pct"] / 100), 3)
    return {"calls_per_burst": calls, "bursts_per_share": len(order) // len(SHADOW_SHARES),
            "shares": rows}  # fmt: skip


def _sim_requests(sim: str, model: str) -> int:
    stats = httpx.get(f"{sim}/simulator/stats", timeout=5).json()
    return int(stats["models"].get(model, {}).get("requests", 0))


async def _hold(bench: Bench, sim: str, bootstrap: str, topics: Topics, pid: int) -> float:
    """RSS (MB) of the worker once IN_FLIGHT calls are open at the simulator."""
    counter = TopicCounter(bootstrap, topics.results)
    await counter.start()
    try:
        count = bench.scale(IN_FLIGHT, 50)
        await produce_all(
            bootstrap, topics.tier("hold"), (routed("hold", topics, i) for i in range(count))
        )
        deadline = time.monotonic() + 60
        while _sim_requests(sim, HOLD_MODEL) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the hold tier never had all its calls in flight")
            await asyncio.sleep(0.1)
        rss = ProcSampler([pid]).rss_mb()
        if not await counter.wait_for(count, 120):
            raise RuntimeError("held calls did not all complete")
        return rss
    finally:
        await counter.stop()


def _baseline(sim: str, calls: int, stream: bool) -> dict[str, float]:
    argv = [
        python(),
        "-m",
        "bench.bare_litellm",
        "--api-base",
        f"{sim}/v1",
        "--model",
        f"openai/{MODEL}",
        "--calls",
        str(calls),
        "--concurrency",
        str(CONCURRENCY),
    ]
    if not stream:
        argv.append("--no-stream")
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(bench: Bench) -> Section:
    calls = bench.scale(6000, 200)
    with bench.scope():
        bootstrap = bench.broker()
        redis_url = bench.redis()
        sim = bench.simulator(profiles=PROFILES)
        sim_pid = bench.children[-1].pid
        config = write_config(
            bench.work_dir / "worker-bench.yaml",
            {
                "bench": tier_spec(sim, MODEL, interactive=False, concurrency=CONCURRENCY),
                "hold": tier_spec(
                    sim, HOLD_MODEL, interactive=False, concurrency=CONCURRENCY, timeout_s=60
                ),
                "mirror": tier_spec(sim, MODEL, interactive=False, concurrency=CONCURRENCY),
            },
            "bench",
            experiments={
                EXPERIMENT: {
                    "tier": "bench",
                    "candidate": {**tier_spec(sim, MODEL)["models"][0], "name": f"{MODEL}-next"},
                    "share": 50,
                    "steps": [50, 100],
                    "criteria": ["error_rate < 1"],
                },
                SHADOW: {
                    "tier": "mirror",
                    "mode": "shadow",
                    "share": 100,  # the bench tags the requests itself, at each share
                    "sticky": "request",
                    "max_in_flight": CONCURRENCY,  # every mirror compared, none dropped
                    "max_lag_s": 600,
                    "candidate": {**tier_spec(sim, MODEL)["models"][0], "name": f"{MODEL}-shadow"},
                },
            },
        )
        baseline_calls = bench.scale(1000, 100)
        sampler = ProcSampler([sim_pid]).start()
        stream = _baseline(sim, baseline_calls, stream=True)
        sim_cpu_baseline = sampler.stop().cpu_s
        plain = _baseline(sim, baseline_calls, stream=False)

        stack = start_stack(
            bench,
            config,
            bootstrap=bootstrap,
            redis_url=redis_url,
            tiers=("bench", "hold", "mirror"),
            metrics=False,
            router=False,
            shadow=True,
            extra_env={"SWITCHBOARD_SHADOW_CONCURRENCY": str(CONCURRENCY)},
        )
        topics = Topics(stack.prefix)
        worker = stack.pid("worker-bench")
        asyncio.run(_burst(bootstrap, topics, "bench", 50, 60))  # warm the worker's pool
        sampler = ProcSampler([worker]).start()
        sim_sampler = ProcSampler([sim_pid]).start()
        wall, done = asyncio.run(_burst(bootstrap, topics, "bench", calls, 300))
        sample = sampler.stop()
        sim_cpu = sim_sampler.stop().cpu_s
        # before the held calls, whose results land on the same results topic as every burst's
        canary = _canary_cost(bootstrap, topics, worker, calls)
        shadow = _shadow_cost(
            bootstrap, topics, stack.pid("worker-mirror"), stack.pid("shadow"), calls, bench.quick
        )
        rss_hold = asyncio.run(_hold(bench, sim, bootstrap, topics, stack.pid("worker-hold")))

    data: dict[str, Any] = {
        "calls": calls,
        "completed": done,
        "simulator_latency_ms": 500,
        "concurrency": CONCURRENCY,
        "calls_per_s": round(calls / wall, 1),
        "cpu_ms_per_call": round(sample.cpu_s / calls * 1000, 3),
        "rss_mb_peak": round(sample.rss_mb_peak, 1),
        "rss_mb_at_1000_in_flight": round(rss_hold, 1),
        "simulator_cpu_ms_per_call": round(sim_cpu / calls * 1000, 3),
        "baseline_litellm_calls_per_s": stream["calls_per_s"],
        "baseline_litellm_cpu_ms_per_call": stream["cpu_ms_per_call"],
        "baseline_litellm_nonstream_cpu_ms_per_call": plain["cpu_ms_per_call"],
        "baseline_litellm_nonstream_calls_per_s": plain["calls_per_s"],
        "baseline_errors": stream["errors"] + plain["errors"],
        "baseline_simulator_cpu_ms_per_call": round(sim_cpu_baseline / baseline_calls * 1000, 3),
        "experiments": {**canary, "shadow": shadow},
    }
    return Section("worker", data, _markdown(data))


def _canary_cost(bootstrap: str, topics: Topics, worker: int, calls: int) -> dict[str, float]:
    """CPU per call of the same worker on requests outside any experiment and on requests of a
    canary at 50 % (half of them on the candidate), in alternating bursts: off, on, off, on."""
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for canary in (False, True, False, True):
        sampler = ProcSampler([worker]).start()
        _, done = asyncio.run(_burst(bootstrap, topics, "bench", calls, 300, canary=canary))
        if not done:
            raise RuntimeError("a canary-cost burst was not answered in full")
        cpu["on" if canary else "off"].append(sampler.stop().cpu_s / calls * 1000)
    off, on = sum(cpu["off"]) / 2, sum(cpu["on"]) / 2
    return {
        "cpu_ms_per_call_off": round(off, 3),
        "cpu_ms_per_call_canary": round(on, 3),
        "canary_extra_pct": round((on - off) / off * 100, 1),
    }


def _markdown(d: dict[str, Any]) -> str:
    e = d["experiments"]
    return "\n".join(
        [
            "## Worker throughput (one process, simulator answering in 500 ms)",
            "",
            "| | calls/s | CPU ms per call | simulator CPU ms per call |",
            "|---|---:|---:|---:|",
            f"| Switchboard worker (Kafka in, result + event out) | {d['calls_per_s']} | "
            f"{d['cpu_ms_per_call']} | {d['simulator_cpu_ms_per_call']} |",
            f"| bare `litellm.acompletion`, streamed | {d['baseline_litellm_calls_per_s']} | "
            f"{d['baseline_litellm_cpu_ms_per_call']} | {d['baseline_simulator_cpu_ms_per_call']} |",
            f"| bare `litellm.acompletion`, not streamed | "
            f"{d['baseline_litellm_nonstream_calls_per_s']} | "
            f"{d['baseline_litellm_nonstream_cpu_ms_per_call']} | |",
            "",
            f"{d['calls']} calls at up to {d['concurrency']} in flight; worker RSS peak "
            f"{d['rss_mb_peak']} MB, {d['rss_mb_at_1000_in_flight']} MB with 1,000 calls open.",
            "",
            f"With a canary at 50 % (alternating bursts of the same size, two of each): "
            f"{e['cpu_ms_per_call_canary']} ms CPU per call against {e['cpu_ms_per_call_off']} "
            f"ms outside any experiment, {e['canary_extra_pct']:+.1f} % (target < 5 %).",
            "",
            f"A shadow experiment at each share ({e['shadow']['calls_per_burst']} requests of "
            "the tier per burst, two bursts per share in the order 0, 10, 50, 100, 100, 50, "
            "10, 0 %, after one uncounted burst at 100 %): CPU per request of the tier, of its "
            "worker and of the shadow worker, from the first send to the last result and the "
            "last comparison, the mean of the two bursts. The cost follows the share when the "
            "extra per mirrored request stays the same at every share. At 10 % the extra per "
            "request is about the size of the tier's worker's spread from burst to burst "
            "(it came out below the 0 % figure in one run), so the target judges 50 and 100 %.",
            "",
            "| share | mirrored | not compared | tier's worker ms | shadow worker ms | total ms "
            "| extra ms | extra ms per mirrored request |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {r['share_pct']} % | {r['mirrored']} | "
                f"{r['mirrored'] - r['outcomes'].get('compared', 0)} | "
                f"{r['worker_cpu_ms_per_request']} | "
                f"{r['shadow_cpu_ms_per_request']} | {r['total_cpu_ms_per_request']} | "
                f"{r.get('extra_cpu_ms_per_request', '')} | "
                f"{r.get('extra_cpu_ms_per_mirror', '')} |"
                for r in e["shadow"]["shares"]
            ),
            *(
                f"\nNot compared at {r['share_pct']} %: "
                + "; ".join(f"{n}: {reason}" for reason, n in r["not_compared"].items())
                for r in e["shadow"]["shares"]
                if r["not_compared"]
            ),
        ]
    )
