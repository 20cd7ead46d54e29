"""Scenario 1, sync overhead: what a synchronous call through Switchboard costs over calling the
provider directly, beside the LiteLLM proxy, under open-loop load.

Four targets answer the same OpenAI chat request from the same simulated model (a fixed 50 ms,
no jitter): the simulator itself (*direct*), Switchboard's HTTP front door (router → Kafka →
worker → simulator → Kafka → router), the LiteLLM proxy as it starts by default (one process),
and the LiteLLM proxy with ``--num_workers`` equal to the cores, as its users run it: the peer on
the same cores Switchboard's processes share. ``bench.loadgen`` drives each at 50, 100, 200 and
500 RPS from its own process. At every rate the four run back to back, so a noisy neighbour on
the shared machine hurts all of them alike rather than one whole column.

A target that collapsed (a fifth of its requests failed, or a median of seconds: its queue grows
without bound) is not driven at higher rates, except at 200 RPS where the issue's targets are
set: more load would only add timeouts and leave a backlog that slows the next target on the same
cores. After each step the target is probed until it answers promptly again, for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import (
    ROOT,
    Bench,
    ProcSampler,
    RunningStack,
    Section,
    base_env,
    percentile,
    process_tree,
    python,
    routing_config,
    start_stack,
    unique_prefix,
)
from bench.litellm_proxy import LiteLLMProxy, start_proxy
from schemas.v1 import AUTO_MODEL
from services.common.kafka import ensure_topics
from services.common.settings import CommonSettings
from switchboard.embedded import Child

MODEL = "sim-fixed50"
PROFILE: dict[str, Any] = {
    "ttft_s": 0.05,
    "tokens_per_s": math.inf,  # the whole answer at once: total time is exactly ttft_s
    "output_tokens": 16,
    "jitter": 0.0,
}
CORES = os.cpu_count() or 1
TARGETS = ("direct", "switchboard", "litellm", "litellm_workers")
PEERS = ("litellm", "litellm_workers")  # the LiteLLM proxy: one process, then one per core
LABELS = {
    "direct": "Direct",
    "switchboard": "Switchboard",
    "litellm": "LiteLLM proxy (1 process)",
    "litellm_workers": f"LiteLLM proxy ({CORES} workers)",
}
PROXY_PROCS = {"litellm": "litellm-proxy", "litellm_workers": f"litellm-proxy-x{CORES}"}
FULL_RATES = (50, 100, 200, 500)
QUICK_RATES = (20,)
TIMEOUT_S = 10.0
PRIME_RPS = 20
# Enough that the worker's own limit never throttles 500 RPS, even with a queue behind it.
TIER_CONCURRENCY = 512
# Past this error rate or median a target has collapsed and is not driven at higher rates.
COLLAPSED_ERRORS, COLLAPSED_P50_MS = 0.2, 2000.0
# "Stable" adds a latency bar to the error bar: a short step can end before a growing
# queue pushes requests past the timeout, so under 1% errors alone can hide an overload.
STABLE_P99_MS = 1000.0
SUSTAINED = 0.01  # the bar: under 1% errors
# The rate of the targets: overhead p50 ≤ 10 ms, p99 ≤ 30 ms, p99 below LiteLLM's.
TARGET_RATE, TARGET_P50_MS, TARGET_P99_MS = 200, 10.0, 30.0
# A generator that started its requests this late (p99) or this much below rate has lagged.
LAG_P99_LIMIT_MS, ACHIEVED_MIN = 10.0, 0.98
# Other programs using this much CPU during a step make its figures suspect on a 2-core box.
NOISY_CORES = 0.25
PROMPT = [{"role": "user", "content": "Summarise this support ticket in one line: parcel late."}]


@dataclass(frozen=True)
class Plan:
    """The scenario's sizes: a full run must fit in about 3 minutes with the proxy's start."""

    rates: tuple[int, ...]
    duration_s: float
    warmup_s: float  # unmeasured, before each step, at the step's rate
    prime_s: float  # unmeasured, once per target at PRIME_RPS: lazy imports, first connections
    settle_s: float  # longest wait for a target to answer promptly after a step
    idle_s: float  # CPU of the started processes with no traffic, measured this long

    @classmethod
    def for_bench(cls, bench: Bench) -> Plan:
        if bench.quick:
            return cls(QUICK_RATES, 2.0, warmup_s=0.5, prime_s=1.0, settle_s=5.0, idle_s=1.0)
        return cls(FULL_RATES, 8.0, warmup_s=1.0, prime_s=2.0, settle_s=10.0, idle_s=2.0)


@dataclass
class Target:
    name: str
    url: str
    body_file: Path
    headers: dict[str, str] = field(default_factory=dict)
    # The processes whose CPU this target's requests cost (the simulator is shared by all); a
    # process's figures include its descendants (the proxy's workers).
    procs: dict[str, int] = field(default_factory=dict)
    # Called around each step: a start hook returning a stop hook, whose dict joins the result.
    observe: Callable[[], Callable[[], dict[str, Any]]] | None = None
    loadgen_args: tuple[str, ...] = ()  # more arguments for bench.loadgen (``--stream``)


# --- running the generator ---------------------------------------------------------------------


def drive(target: Target, rate: float, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """One open-loop run of ``bench.loadgen`` in its own process; its JSON result."""
    argv = [
        python(),
        "-m",
        "bench.loadgen",
        "--url",
        target.url,
        "--rate",
        str(rate),
        "--duration",
        str(duration_s),
        "--warmup",
        str(warmup_s),
        "--timeout",
        str(TIMEOUT_S),
        "--body-file",
        str(target.body_file),
    ]
    for name, value in target.headers.items():
        argv += ["--header", f"{name}: {value}"]
    argv += target.loadgen_args
    limit = warmup_s + duration_s + TIMEOUT_S + 60
    done = subprocess.run(
        argv, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=limit
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def settle(target: Target, prompt_s: float, limit_s: float) -> float:
    """Probe one request at a time until one answers within ``prompt_s``; seconds it took.

    A target left with a queue (the proxy after an overload) would otherwise pass its backlog on
    to whichever target runs next on the same cores.
    """
    t0 = time.perf_counter()
    body = target.body_file.read_bytes()
    headers = {"content-type": "application/json", **target.headers}
    with httpx.Client(timeout=TIMEOUT_S) as client:
        while time.perf_counter() - t0 < limit_s:
            start = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                if client.post(target.url, content=body, headers=headers).status_code == 200:
                    if time.perf_counter() - start <= prompt_s:
                        break
                    continue
            time.sleep(0.1)  # failed at once: do not hammer a target that refuses
    return round(time.perf_counter() - t0, 2)


def _cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (the proxy's workers)."""
    total = 0.0
    for each in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(each).cpu_times()
            total += t.user + t.system
    return total


class CpuWindow:
    """CPU seconds of some processes and of the whole machine over one window.

    The machine figure minus ours is what *other* programs used: on a shared box that is the
    noise the report has to show beside the latencies it disturbed.
    """

    def __init__(self, procs: Mapping[str, int]) -> None:
        self.procs = dict(procs)
        self._cpu0 = {name: _cpu_s(pid) for name, pid in self.procs.items()}
        psutil.cpu_percent(None)
        self._wall0 = time.perf_counter()

    def close(self, extra_cpu_s: float = 0.0) -> dict[str, Any]:
        """Cores used per process, by the machine, and by everything else (``extra_cpu_s``: ours
        outside ``procs``, such as the generator)."""
        wall = time.perf_counter() - self._wall0
        machine = psutil.cpu_percent(None) / 100 * (psutil.cpu_count() or 1)
        cpu = {n: round(_cpu_s(pid) - self._cpu0[n], 3) for n, pid in self.procs.items()}
        ours = (sum(cpu.values()) + extra_cpu_s) / wall
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "machine_cores": round(machine, 2),
            "other_cores": round(max(0.0, machine - ours), 2),
        }


def idle_load(watched: Mapping[str, int], seconds: float) -> dict[str, Any]:
    """What the started processes cost with no traffic (consumers polling the broker)."""
    window = CpuWindow(watched)
    time.sleep(seconds)
    w = window.close()
    return {
        "seconds": seconds,
        "cores": {n: round(s / w["wall_s"], 3) for n, s in w["cpu_s"].items()},
        "machine_cores": w["machine_cores"],
        "other_cores": w["other_cores"],
    }


def step(target: Target, rate: int, plan: Plan, watched: Mapping[str, int]) -> dict[str, Any]:
    """Drive ``target`` at ``rate``; add the CPU its processes, ours and the machine used."""
    window = CpuWindow(watched)
    stop_observing = target.observe() if target.observe else None
    result = drive(target, rate, plan.duration_s, plan.warmup_s)
    w = window.close(extra_cpu_s=result.get("generator_cpu_s") or 0.0)
    if stop_observing:
        result.update(stop_observing())
    requests = result["sent"] + round(rate * plan.warmup_s)
    cpu = {n: s for n, s in w["cpu_s"].items() if n in target.procs}
    result.update(
        cpu_s=cpu,
        cpu_ms_per_request={n: round(s * 1000 / requests, 3) for n, s in cpu.items()},
        cores_busy={n: round(s / w["wall_s"], 2) for n, s in cpu.items()},
        step_wall_s=round(w["wall_s"], 2),
        machine_cores=w["machine_cores"],
        other_cores=w["other_cores"],
        generator_kept_up=kept_up(result),
    )
    return result


def kept_up(result: Mapping[str, Any]) -> bool:
    achieved, lag = result.get("achieved_rps"), result.get("lag_p99_ms")
    if achieved is None or lag is None:
        return False
    return bool(achieved >= ACHIEVED_MIN * result["rate"] and lag <= LAG_P99_LIMIT_MS)


def skipped(reason: str) -> dict[str, Any]:
    """The entry of a step not run: every key a measured step has, with no values."""
    keys = ("p50_ms", "p95_ms", "p99_ms", "errors", "sent", "error_rate", "achieved_rps")
    return {**dict.fromkeys(keys), "skipped": reason}


# --- the scenario --------------------------------------------------------------------------------


def child_named(bench: Bench, prefix: str) -> Child:
    """The most recent child of ``bench`` whose name starts with ``prefix``.

    ``Bench.simulator()``/``broker()``/``redis()`` return addresses only; their pids are needed
    for CPU and RSS.
    """
    for child in reversed(bench.children):
        if child.name.startswith(prefix):
            return child
    raise LookupError(prefix)


def body_file(bench: Bench, name: str, model: str) -> Path:
    path = bench.work_dir / f"sync-{name}.json"
    path.write_text(json.dumps({"model": model, "messages": PROMPT}))
    return path


def make_targets(
    bench: Bench,
    sim_url: str,
    sim: Child,
    stack: RunningStack,
    extra_stack: Mapping[str, int],
    proxies: Mapping[str, LiteLLMProxy],
) -> dict[str, Target]:
    """The four targets: same prompt, same simulated model, each with its own processes."""
    stack_procs = {name: child.pid for name, child in stack.children.items()}
    return {
        "direct": Target(
            "direct",
            f"{sim_url}/v1/chat/completions",
            body_file(bench, "direct", MODEL),
            procs={"simulator": sim.pid},
        ),
        "switchboard": Target(
            "switchboard",
            f"{stack.base_url}/v1/chat/completions",
            body_file(bench, "switchboard", AUTO_MODEL),
            {"authorization": f"Bearer {stack.api_key}"},
            procs={**stack_procs, **extra_stack},
        ),
        **proxy_targets(bench, proxies, MODEL),
    }


def proxy_targets(
    bench: Bench, proxies: Mapping[str, LiteLLMProxy], model: str
) -> dict[str, Target]:
    """One target per started proxy (keys of ``PEERS``), asking for ``model``."""
    return {
        name: Target(
            name,
            f"{proxy.url}/v1/chat/completions",
            body_file(bench, f"{name}-{model}", model),
            {"authorization": f"Bearer {proxy.key}"},
            procs={PROXY_PROCS[name]: proxy.pid},
        )
        for name, proxy in proxies.items()
    }


def start_proxies(bench: Bench, sim_url: str, models: list[str]) -> dict[str, LiteLLMProxy]:
    """The LiteLLM proxy twice, on the same simulator: one process, and one worker per core."""
    return {
        "litellm": start_proxy(bench, sim_url, models),
        "litellm_workers": start_proxy(bench, sim_url, models, workers=CORES),
    }


def usage_of(samplers: Mapping[str, ProcSampler]) -> dict[str, dict[str, float]]:
    """Peak RSS and CPU of each sampled process (with its descendants) since it started."""
    return {
        name: {"peak_rss_mb": round(u.rss_mb_peak, 1), "cpu_s": round(u.cpu_s, 2)}
        for name, u in ((n, s.stop()) for n, s in samplers.items())
    }


def run(bench: Bench) -> Section:
    plan = Plan.for_bench(bench)
    with bench.scope():
        sim_url = bench.simulator(profiles={MODEL: PROFILE})
        sim = child_named(bench, "simulator-")
        proxies = start_proxies(bench, sim_url, [MODEL])  # they boot while the stack starts
        bootstrap = bench.broker()
        broker = child_named(bench, "broker")
        redis_url = bench.redis()
        redis = child_named(bench, "redis")
        config = routing_config(
            bench.work_dir / "sync.yaml",
            sim_url,
            MODEL,
            interactive=True,
            concurrency=TIER_CONCURRENCY,
        )
        stack = start_stack(bench, config, bootstrap=bootstrap, redis_url=redis_url)
        for proxy in proxies.values():
            proxy.wait_ready()
        extra = {"broker": broker.pid, "redis": redis.pid}
        by_name = make_targets(bench, sim_url, sim, stack, extra, proxies)
        watched = {n: pid for t in by_name.values() for n, pid in t.procs.items()}
        samplers = {n: ProcSampler(process_tree(pid)).start() for n, pid in watched.items()}
        idle = idle_load(watched, plan.idle_s)
        hop = asyncio.run(kafka_hop(bootstrap, bench.scale(300, 50)))
        t0 = time.perf_counter()
        try:
            rates, primed = sweep(by_name, plan, watched)
        finally:
            processes = usage_of(samplers)
        data = summarise(plan, rates, primed)
        data.update(
            kafka_hop=hop,
            idle=idle,
            sweep_s=round(time.perf_counter() - t0, 1),
            processes=processes,
            rss_mb={
                "router": processes["router"]["peak_rss_mb"],
                "worker": processes["worker-bench"]["peak_rss_mb"],
                **{n: processes[n]["peak_rss_mb"] for n in PROXY_PROCS.values()},
            },
            **switchboard_cpu(rates),
            litellm_proxy=proxies["litellm"].settings,
            litellm_proxies={name: proxy.settings for name, proxy in proxies.items()},
            switchboard={
                "model": AUTO_MODEL,
                "tier": "bench",
                "tier_concurrency": TIER_CONCURRENCY,
                "config": config.read_text(),
                "processes": sorted(by_name["switchboard"].procs),
            },
        )
    return Section(key="sync", data=data, markdown=markdown(data))


async def kafka_hop(bootstrap: str, samples: int) -> dict[str, Any]:
    """One Kafka hop on this broker, alone: produce (acks=all, linger 1 ms, as the services
    publish) and consume in a group with the interactive fetch wait the services use.

    A sync request crosses two such hops (tier topic, reply topic); this is what the broker
    alone puts under Switchboard's overhead, measured in the same run.
    """
    wait_ms = CommonSettings.model_fields["fetch_wait_interactive_ms"].default
    topic = unique_prefix("hop")
    await ensure_topics(bootstrap, [topic], 4)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=topic,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=wait_ms,
    )
    await producer.start()
    await consumer.start()
    acks: list[float] = []
    hops: list[float] = []
    try:
        async with asyncio.timeout(120):
            await producer.send_and_wait(topic, b"join")  # the first one waits for the group join
            await consumer.getone()
            for i in range(samples):
                t0 = time.perf_counter()
                await producer.send_and_wait(topic, b"x" * 512, key=str(i).encode())
                t1 = time.perf_counter()
                await consumer.getone()
                t2 = time.perf_counter()
                acks.append((t1 - t0) * 1000)
                hops.append((t2 - t0) * 1000)
                await asyncio.sleep(0.01)  # a fresh fetch cycle each time, not a backlog
    finally:
        await consumer.stop()
        await producer.stop()
    acks.sort()
    hops.sort()
    return {
        "samples": samples,
        "fetch_wait_ms": wait_ms,
        "produce_ack_p50_ms": round(percentile(acks, 50), 2),
        "hop_p50_ms": round(percentile(hops, 50), 2),
        "hop_p99_ms": round(percentile(hops, 99), 2),
    }


def sweep(
    by_name: Mapping[str, Target],
    plan: Plan,
    watched: Mapping[str, int],
    *,
    prompt_s: float = 4 * PROFILE["ttft_s"] + 0.2,
    always_rate: int | None = TARGET_RATE,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Prime each target, then every rate with the targets back to back, in ``by_name``'s
    order. A collapsed target is not driven again except at ``always_rate``; after each step a
    target is probed until it answers within ``prompt_s``."""
    primed = {}
    for name, target in by_name.items():
        primed[name] = drive(target, PRIME_RPS, plan.prime_s, 0.0)
        settle(target, prompt_s, plan.settle_s)
    rates: dict[str, dict[str, Any]] = {}
    collapsed: dict[str, str] = {}
    for rate in plan.rates:
        rates[str(rate)] = {}
        for name in by_name:
            if name in collapsed and rate != always_rate:
                rates[str(rate)][name] = skipped(collapsed[name])
                continue
            result = step(by_name[name], rate, plan, watched)
            result["settle_s"] = settle(by_name[name], prompt_s, plan.settle_s)
            rates[str(rate)][name] = result
            if name not in collapsed and (reason := collapse(result)):
                collapsed[name] = f"{reason} at {rate} RPS"
    return rates, primed


def collapse(result: Mapping[str, Any]) -> str | None:
    """Why a step shows its target overloaded past recovery, or None."""
    if (result["error_rate"] or 0) >= COLLAPSED_ERRORS:
        return f"{result['error_rate']:.0%} errors"
    if result["p50_ms"] is not None and result["p50_ms"] >= COLLAPSED_P50_MS:
        return f"p50 {result['p50_ms'] / 1000:.1f} s"
    return None


def switchboard_cpu(rates: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Switchboard's CPU ms per request by process, at the target rate or else the highest
    rate it ran: what its figures cost, for the targets table."""
    ran = [r for r in rates if "skipped" not in rates[r]["switchboard"]]
    if not ran:
        return {"cpu_ms_per_request": {}, "cpu_ms_per_request_rps": None}
    rate = str(TARGET_RATE) if str(TARGET_RATE) in ran else max(ran, key=int)
    return {
        "cpu_ms_per_request": rates[rate]["switchboard"]["cpu_ms_per_request"],
        "cpu_ms_per_request_rps": int(rate),
    }


# --- figures --------------------------------------------------------------------------------------


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def sweep_figures(rates: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """What every sweep reports of its targets ``names`` (``direct`` first): overhead over
    direct, the highest sustained and stable rates, and the steps whose generator lagged."""
    overhead = {
        rate: {
            name: {
                "p50_ms": _diff(row[name]["p50_ms"], row["direct"]["p50_ms"]),
                "p99_ms": _diff(row[name]["p99_ms"], row["direct"]["p99_ms"]),
            }
            for name in names
            if name != "direct"
        }
        for rate, row in rates.items()
    }
    return {
        "overhead_ms": overhead,
        "max_sustained_rps": {name: max_sustained(rates, name) for name in names},
        "max_stable_rps": {name: max_sustained(rates, name, STABLE_P99_MS) for name in names},
        "stable_p99_ms": STABLE_P99_MS,
        "generator_lagged": [
            f"{name}@{rate}"
            for rate, row in rates.items()
            for name, r in row.items()
            if "skipped" not in r and not r["generator_kept_up"]
        ],
    }


def summarise(
    plan: Plan, rates: Mapping[str, Mapping[str, Any]], primed: Mapping[str, Any]
) -> dict[str, Any]:
    figures = sweep_figures(rates, TARGETS)
    return {
        "profile": {"name": MODEL, **PROFILE, "tokens_per_s": str(PROFILE["tokens_per_s"])},
        "nominal_latency_ms": PROFILE["ttft_s"] * 1000,
        "rate_list": list(plan.rates),
        "duration_s": plan.duration_s,
        "warmup_s": plan.warmup_s,
        "prime": {"rps": PRIME_RPS, "duration_s": plan.prime_s, "results": dict(primed)},
        "timeout_s": TIMEOUT_S,
        "quick": plan.rates == QUICK_RATES,
        "rates": dict(rates),
        **figures,
        "targets": target_check(rates, figures["overhead_ms"]),
    }


def max_sustained(
    rates: Mapping[str, Mapping[str, Any]], name: str, p99_ms: float = math.inf
) -> int | None:
    """The highest rate up to which every step of ``name`` had under 1% errors (and a p99
    under ``p99_ms``); None when even the lowest rate failed."""
    best = None
    for rate in sorted(rates, key=int):
        r = rates[rate][name]
        if r["error_rate"] is None or r["error_rate"] >= SUSTAINED:
            break
        if r["p99_ms"] is None or r["p99_ms"] > p99_ms:
            break
        best = int(rate)
    return best


def target_check(
    rates: Mapping[str, Mapping[str, Any]], overhead: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The issue's three targets at 200 RPS (the p99 one against each proxy): met, missed, or
    not measured (None)."""
    key = str(TARGET_RATE)
    if key not in rates:
        return {"rate": TARGET_RATE, "p50": None, "p99": None} | {
            f"p99_below_{peer}": None for peer in PEERS
        }
    sb = rates[key]["switchboard"]
    over = overhead[key]["switchboard"]
    healthy = sb["error_rate"] is not None and sb["error_rate"] < SUSTAINED

    def within(value: float | None, limit: float) -> bool:
        return healthy and value is not None and value <= limit

    def below(ll: Mapping[str, Any]) -> bool:
        if ll["error_rate"] is None or ll["error_rate"] >= SUSTAINED:
            return healthy  # the proxy did not sustain the rate at all
        return healthy and sb["p99_ms"] is not None and sb["p99_ms"] < ll["p99_ms"]

    return {
        "rate": TARGET_RATE,
        "p50": within(over["p50_ms"], TARGET_P50_MS),
        "p99": within(over["p99_ms"], TARGET_P99_MS),
        **{f"p99_below_{peer}": below(rates[key][peer]) for peer in PEERS},
    }


# --- report ---------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(r: Mapping[str, Any]) -> tuple[str, str]:
    if "skipped" in r:
        return "not run", "-"
    errors = f"{r['errors']}/{r['sent']}"
    if r["errors"]:
        errors += f" ({r['error_rate']:.1%})"
    mark = "" if r["generator_kept_up"] else " ⚠"
    if r["other_cores"] >= NOISY_CORES:
        mark += " *"
    return f"{fmt(r['p50_ms'])} / {fmt(r['p99_ms'])}{mark}", errors


def latency_table(
    rates: Mapping[str, Mapping[str, Any]], names: Sequence[str], labels: Mapping[str, str]
) -> list[str]:
    """p50 / p99 and errors of every target at every rate."""
    lines = [
        "| RPS | " + " | ".join(f"{labels[t]} p50 / p99 | errors" for t in names) + " |",
        "|---:|" + "---:|---:|" * len(names),
    ]
    for rate, row in rates.items():
        cells = [c for t in names for c in _cell(row[t])]
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    return lines


def overhead_table(
    overhead: Mapping[str, Mapping[str, Any]], names: Sequence[str], labels: Mapping[str, str]
) -> list[str]:
    """Each target's p50 and p99 minus direct's, at every rate."""
    names = [n for n in names if n != "direct"]
    lines = [
        "| RPS | " + " | ".join(f"{labels[n]} Δp50 | {labels[n]} Δp99" for n in names) + " |",
        "|---:|" + "---:|---:|" * len(names),
    ]
    for rate, row in overhead.items():
        cells = [fmt(row[n][k]) for n in names for k in ("p50_ms", "p99_ms")]
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    return lines


def sustained_line(data: Mapping[str, Any], names: Sequence[str], labels: Mapping[str, str]) -> str:
    sustained, stable = data["max_sustained_rps"], data["max_stable_rps"]
    return (
        "Highest rate sustained with under 1% errors: "
        + ", ".join(f"{labels[t]} {_rps(sustained[t])}" for t in names)
        + f"; with p99 also under {STABLE_P99_MS / 1000:g} s: "
        + ", ".join(f"{labels[t]} {_rps(stable[t])}" for t in names)
        + "."
    )


def proxy_words(data: Mapping[str, Any]) -> str:
    """How the two proxies were started, for a report's method paragraph."""
    workers = data["litellm_proxies"]["litellm_workers"]["workers"]
    return (
        f"LiteLLM proxy {data['litellm_proxy']['version']}: defaults (one process, no database, "
        f"no cache), and the same with `--num_workers {workers}` (uvicorn's supervisor and "
        f"{workers} worker processes, its figures those of the whole process tree); both bound "
        "to 127.0.0.1, both with only a master key and the model list."
    )


def markdown(data: Mapping[str, Any]) -> str:
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    p = data["profile"]
    lines = [
        "## Sync overhead: direct vs Switchboard vs LiteLLM proxy (one process, one per core)",
        "",
        f"Open-loop load (`bench.loadgen`, its own process, aiohttp, no connection limit), "
        f"{data['duration_s']:g} s measured per step after {data['warmup_s']:g} s unmeasured "
        f"warm-up; each target first primed for {data['prime']['duration_s']:g} s at "
        f"{data['prime']['rps']} RPS. Latency runs from each request's scheduled send time to "
        f"the end of its answer; percentiles over successful requests. An error is a non-200, a "
        f"connection failure, or no answer {data['timeout_s']:g} s after the scheduled time. "
        f"Upstream: simulator profile `{p['name']}`, {data['nominal_latency_ms']:g} ms fixed "
        f"(ttft {p['ttft_s']} s, no pacing, {p['output_tokens']} tokens, no jitter). "
        f"Switchboard: one router, one worker (tier concurrency "
        f"{data['switchboard']['tier_concurrency']}), metrics, Tansu, Redis; model "
        f"`{data['switchboard']['model']}`. " + proxy_words(data),
        "",
        "p50 / p99 in ms; errors as failed/sent. ⚠: the generator fell behind its schedule. "
        f"*: programs outside this benchmark used ≥ {NOISY_CORES} cores during the step.",
        "",
        *latency_table(rates, TARGETS, LABELS),
        "",
        "Overhead over direct (target minus direct, ms):",
        "",
        *overhead_table(data["overhead_ms"], TARGETS, LABELS),
    ]
    hop = data["kafka_hop"]
    lines += [
        "",
        f"One Kafka hop on this broker, measured alone before the sweep ({hop['samples']} "
        f"messages one at a time; acks=all, linger 1 ms, consumer fetch wait "
        f"{hop['fetch_wait_ms']} ms, as the services use): produce acknowledged at p50 "
        f"{hop['produce_ack_p50_ms']} ms, produce to consume p50 {hop['hop_p50_ms']} ms, p99 "
        f"{hop['hop_p99_ms']} ms. A sync request crosses two hops (tier topic, then reply "
        "topic), so the broker alone accounts for about twice that of the overhead.",
    ]
    lines += [
        "",
        sustained_line(data, TARGETS, LABELS),
        "",
        *resource_table(data),
        "",
        verdict(data),
    ]
    return "\n".join(lines) + "\n"


def _rps(value: int | None) -> str:
    return "none of the rates" if value is None else f"{value} RPS"


def resource_table(data: Mapping[str, Any]) -> list[str]:
    """Peak RSS and CPU of each process over the sweep, and CPU per request at each rate."""
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    names = list(data["processes"])
    owner = {n: t for t in TARGETS for r in rates.values() for n in r[t].get("cpu_s") or {}}
    header = "| Process | peak RSS MB | CPU s (sweep) | " + " | ".join(
        f"CPU ms/req @{rate}" for rate in rates
    )
    lines = [header + " |", "|---|---:|---:|" + "---:|" * len(rates)]
    for name in names:
        proc = data["processes"][name]
        per = []
        for row in rates.values():
            cpu = row.get(owner.get(name, ""), {}).get("cpu_ms_per_request") or {}
            per.append(fmt(cpu.get(name), 2))
        lines.append(
            f"| {name} | {fmt(proc['peak_rss_mb'])} | {fmt(proc['cpu_s'], 2)} | "
            + " | ".join(per)
            + " |"
        )
    idle = data["idle"]
    lines += [
        "",
        "CPU per request is the process's CPU over the step (warm-up included) divided by the "
        "requests sent; it includes idle polling, which dominates at low rates. With no traffic "
        f"({idle['seconds']:g} s before the sweep) the processes used "
        + ", ".join(f"{n} {c:.2f}" for n, c in idle["cores"].items())
        + f" cores; the machine {idle['machine_cores']:.2f} of "
        f"{psutil.cpu_count() or 1}, {idle['other_cores']:.2f} of it outside this benchmark.",
    ]
    return lines


def verdict(data: Mapping[str, Any]) -> str:
    """One paragraph from the measured figures: the targets, then what limited each target."""
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    check = data["targets"]
    key = str(TARGET_RATE)
    parts: list[str] = []
    if check["p50"] is None:
        parts.append(
            f"The targets are set at {TARGET_RATE} RPS, which this run (quick mode) did not "
            "measure."
        )
    else:
        over = data["overhead_ms"][key]["switchboard"]
        sb = rates[key]["switchboard"]
        keys = ("p50", "p99", *(f"p99_below_{peer}" for peer in PEERS))
        met = [k for k in keys if check[k]]
        missed = [k for k in keys if not check[k]]
        words = {
            "p50": f"overhead p50 ≤ {TARGET_P50_MS:g} ms ({fmt(over['p50_ms'])} ms)",
            "p99": f"overhead p99 ≤ {TARGET_P99_MS:g} ms ({fmt(over['p99_ms'])} ms)",
        }
        for peer in PEERS:
            ll = rates[key][peer]
            theirs = (
                _state(ll)
                if ll["error_rate"] is None or ll["error_rate"] >= SUSTAINED
                else f"{fmt(ll['p99_ms'])} ms"
            )
            words[f"p99_below_{peer}"] = (
                f"p99 below {LABELS[peer]}'s ({fmt(sb['p99_ms'])} vs {theirs})"
            )
        if sb["error_rate"] is None or sb["error_rate"] >= SUSTAINED:
            parts.append(
                f"At {TARGET_RATE} RPS Switchboard had {_state(sb)}, so none of the targets is "
                f"met ("
                + ", ".join(words[k] for k in ("p50", "p99"))
                + "); "
                + ", ".join(f"{LABELS[peer]} had {_state(rates[key][peer])}" for peer in PEERS)
                + " there."
            )
        else:
            parts.append(
                f"At {TARGET_RATE} RPS Switchboard met "
                + (", ".join(words[k] for k in met) or "none of the targets")
                + ("; it missed " + ", ".join(words[k] for k in missed) if missed else "")
                + "."
            )
    for name in TARGETS:
        parts.append(_limit(name, data))
    noisy = [
        f"{name}@{rate} ({r['other_cores']:.2f})"
        for rate, row in rates.items()
        for name, r in row.items()
        if "skipped" not in r and r["other_cores"] >= NOISY_CORES
    ]
    if noisy:
        parts.append(
            "Programs outside this benchmark used CPU (cores) during " + ", ".join(noisy) + "."
        )
    lagged = data["generator_lagged"]
    if lagged:
        parts.append(
            "The generator fell behind its schedule in "
            + ", ".join(lagged)
            + " (the lag is inside those latencies)."
        )
    return " ".join(p for p in parts if p)


def _state(r: Mapping[str, Any]) -> str:
    if "skipped" in r:
        return f"not run: {r['skipped']}"
    return f"{r['error_rate']:.1%} errors"


def _limit(name: str, data: Mapping[str, Any]) -> str:
    """Where ``name`` stopped being stable, from the figures of its first step past that point."""
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    stable = data["max_stable_rps"][name]
    order = sorted(rates, key=int)
    past = [r for r in order if stable is None or int(r) > stable]
    if not past:
        return ""
    sustained = data["max_sustained_rps"][name]
    errors = f"up to {sustained} RPS" if sustained else "at none of the rates"
    latency = f"up to {stable} RPS" if stable else "at none of the rates"
    head = (
        f"{LABELS[name]} kept under 1% errors {errors} and a p99 under "
        f"{STABLE_P99_MS / 1000:g} s {latency}"
    )
    measured = [r for r in past if "skipped" not in rates[r][name]]
    if not measured:
        return f"{head}; higher rates were not run ({rates[past[0]][name]['skipped']})."
    rate = measured[0]
    r = rates[rate][name]
    kinds = ", ".join(f"{k} {v}" for k, v in r["error_kinds"].items()) or "none"
    top = sorted(r["cores_busy"].items(), key=lambda kv: -kv[1])[:3]
    cpu = ", ".join(f"{n} {c:.2f}" for n, c in top)
    return (
        f"{head}: at {rate} RPS its p50 was {fmt(r['p50_ms'])} ms, p99 {fmt(r['p99_ms'])} ms, "
        f"errors {r['error_rate']:.1%} ({kinds}); its busiest processes used {cpu} cores, the "
        f"machine {r['machine_cores']:.2f} of {psutil.cpu_count() or 1} "
        f"({r['other_cores']:.2f} outside this benchmark)."
    )
