"""Scenario ``stream``: what streaming through Switchboard adds to the time to first token, beside
the LiteLLM proxy, under open-loop load; and how many chunks one worker carries.

The four targets of ``bench.sync`` answer the same streamed request (``stream: true`` with
``include_usage``) from the same simulated model: the simulator itself (*direct*), Switchboard's
HTTP front door (router → Kafka → worker → simulator; each delta back as a ``StreamChunk`` on the
router's reply topic → SSE), and the LiteLLM proxy with one process and with one worker per core.
``bench.loadgen --stream`` drives each at 50, 100 and 200 RPS, the four back to back at every
rate, with ``bench.sync``'s plan, collapse rule and settling. A request's TTFT runs from its
*scheduled* send time to the arrival of the first event whose delta carries content; the
overhead is a target's TTFT minus direct's. The issue's goal: ≤ 15 ms at p50 at 100 RPS.

The simulated model, ``sim-stream``: ttft 50 ms (as in ``sync``, so the two scenarios' overheads
compare), 200 tokens/s (a fast small model), 60 tokens, no jitter. The simulator sends one chunk
every 30 ms at the profile's speed (6 tokens here), so an answer is a role chunk at 50 ms, ten
content chunks from 80 ms to 350 ms, a finish chunk, the usage chunk and ``[DONE]``: a stream a
few hundred milliseconds long, about 70 of them open at once at 200 RPS. Its chunks come twice
as far apart as the worker's 15 ms coalescing window, so an idle worker sends each on its own and
the coalescing ratio shows how much load merges them.

Switchboard's reply topics come in generations of 1,000 requests, as ``switchboard up`` sets
them for the embedded broker (``SWITCHBOARD_REPLY_GENERATION_SIZE``): a streamed answer here is
eleven records on the reply topic (ten chunks, then its outcome), and Tansu slows down as a
partition fills. There is no keeper, as in ``sync``: the sweep's few thousand requests leave the
tier and events topics far below the batch counts where Tansu slows.

What limits the overhead is reported as its measured parts: the Kafka hop measured alone (a
first token crosses two: the request to the tier topic, the first chunk to the reply topic); the
worker's own time to first token of its model call (``ttft_ms`` of its attempt rows, read from the
metrics store after the sweep), beside direct's; and the rest, which is the router's and the
worker's own work. Chunks per second through the one worker are the chunk events its answers
carried to the clients (each ``StreamChunk`` record is one event); its CPU per chunk is its CPU
over the step over those chunks, warm-up included.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Bench,
    ProcSampler,
    RunningStack,
    Section,
    process_tree,
    python,
    routing_config,
    start_stack,
)
from bench.litellm_proxy import LiteLLMProxy
from bench.sync import (
    CORES,
    LABELS,
    NOISY_CORES,
    PRIME_RPS,
    PROMPT,
    QUICK_RATES,
    SUSTAINED,
    TARGETS,
    TIER_CONCURRENCY,
    TIMEOUT_S,
    Plan,
    Target,
    _limit,
    child_named,
    fmt,
    idle_load,
    kafka_hop,
    latency_table,
    overhead_table,
    proxy_targets,
    proxy_words,
    resource_table,
    start_proxies,
    sustained_line,
    sweep,
    sweep_figures,
    usage_of,
)
from schemas.topics import EVENTS_TABLE
from schemas.v1 import AUTO_MODEL
from services.simulator.profiles import LatencyProfile
from switchboard.embedded import Child
from switchboard.up import REPLY_GENERATION_SIZE

MODEL = "sim-stream"
PROFILE: dict[str, Any] = {
    "ttft_s": 0.05,
    "tokens_per_s": 200.0,
    "output_tokens": 60,
    "jitter": 0.0,
}
FULL_RATES = (50, 100, 200)
# The goal: TTFT overhead p50 ≤ 15 ms at 100 RPS on the embedded stack.
GOAL_RATE, GOAL_P50_MS = 100, 15.0
STREAM_ARGS = ("--stream",)
WORKER = "worker-bench"


def profile() -> LatencyProfile:
    return LatencyProfile.model_validate(PROFILE)


def plan_for(bench: Bench) -> Plan:
    """``bench.sync``'s plan, at this scenario's rates."""
    base = Plan.for_bench(bench)
    return replace(base, rates=QUICK_RATES if bench.quick else FULL_RATES)


def stream_body(bench: Bench, name: str, model: str) -> Path:
    """The request, asking for a stream with usage (the settling probes stream too)."""
    path = bench.work_dir / f"stream-{name}.json"
    body = {
        "model": model,
        "messages": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    path.write_text(json.dumps(body))
    return path


def _window() -> Callable[[], dict[str, Any]]:
    """The step's wall-clock span, to find its attempts in the metrics store."""
    start = time.time()
    return lambda: {"window": [start, time.time()]}


def make_targets(
    bench: Bench,
    sim_url: str,
    sim: Child,
    stack: RunningStack,
    extra_stack: Mapping[str, int],
    proxies: Mapping[str, LiteLLMProxy],
) -> dict[str, Target]:
    """The four targets of ``bench.sync``, each asked for a stream and read as one."""
    stack_procs = {name: child.pid for name, child in stack.children.items()}
    targets = {
        "direct": Target(
            "direct",
            f"{sim_url}/v1/chat/completions",
            stream_body(bench, "direct", MODEL),
            procs={"simulator": sim.pid},
        ),
        "switchboard": Target(
            "switchboard",
            f"{stack.base_url}/v1/chat/completions",
            stream_body(bench, "switchboard", AUTO_MODEL),
            {"authorization": f"Bearer {stack.api_key}"},
            procs={**stack_procs, **extra_stack},
            observe=_window,
        ),
    }
    for name, target in proxy_targets(bench, proxies, MODEL).items():
        targets[name] = replace(target, body_file=stream_body(bench, name, MODEL))
    return {name: replace(t, loadgen_args=STREAM_ARGS) for name, t in targets.items()}


def run(bench: Bench) -> Section:
    plan = plan_for(bench)
    shape = profile()
    with bench.scope():
        sim_url = bench.simulator(profiles={MODEL: PROFILE})
        sim = child_named(bench, "simulator-")
        proxies = start_proxies(bench, sim_url, [MODEL])  # they boot while the stack starts
        bootstrap = bench.broker()
        broker = child_named(bench, "broker")
        redis_url = bench.redis()
        redis = child_named(bench, "redis")
        config = routing_config(
            bench.work_dir / "stream.yaml",
            sim_url,
            MODEL,
            interactive=True,
            concurrency=TIER_CONCURRENCY,
        )
        generations = {"SWITCHBOARD_REPLY_GENERATION_SIZE": REPLY_GENERATION_SIZE}
        stack = start_stack(
            bench, config, bootstrap=bootstrap, redis_url=redis_url, extra_env=generations
        )
        for proxy in proxies.values():
            proxy.wait_ready()
        extra = {"broker": broker.pid, "redis": redis.pid}
        by_name = make_targets(bench, sim_url, sim, stack, extra, proxies)
        watched = {n: pid for t in by_name.values() for n, pid in t.procs.items()}
        samplers = {n: ProcSampler(process_tree(pid)).start() for n, pid in watched.items()}
        idle = idle_load(watched, plan.idle_s)
        hop = asyncio.run(kafka_hop(bootstrap, bench.scale(300, 50)))
        t0 = time.perf_counter()
        prompt_s = 2 * shape.nominal_total_s + 0.2
        try:
            rates, primed = sweep(by_name, plan, watched, prompt_s=prompt_s, always_rate=GOAL_RATE)
        finally:
            processes = usage_of(samplers)
        sweep_s = round(time.perf_counter() - t0, 1)
        # the metrics writer owns its chDB directory: stop it, then read its attempt rows
        bench.stop(stack.children["metrics"])
        calls = worker_calls(data_dir(bench, stack), rates)
        data = summarise(plan, rates, primed, hop, calls, shape)
        data.update(
            idle=idle,
            sweep_s=sweep_s,
            processes=processes,
            litellm_proxy=proxies["litellm"].settings,
            litellm_proxies={name: proxy.settings for name, proxy in proxies.items()},
            switchboard={
                "model": AUTO_MODEL,
                "tier": "bench",
                "tier_concurrency": TIER_CONCURRENCY,
                "reply_generation_size": int(REPLY_GENERATION_SIZE),
                "config": config.read_text(),
                "processes": sorted(by_name["switchboard"].procs),
            },
        )
    return Section(key="stream", data=data, markdown=markdown(data))


def data_dir(bench: Bench, stack: RunningStack) -> Path:
    """The metrics writer's data directory, as ``start_stack`` names it."""
    return bench.work_dir / f"data-{stack.prefix}"


_CALLS = """
import json, sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
out = {}
for key, (start, end) in json.loads(sys.argv[2]).items():
    row = client.query(
        "SELECT count(), countIf(status = 'ok'), "
        "quantileExactIf(0.5)(ttft_ms, status = 'ok' AND ttft_ms IS NOT NULL), "
        "quantileExactIf(0.99)(ttft_ms, status = 'ok' AND ttft_ms IS NOT NULL), "
        "quantileExactIf(0.5)(latency_ms, status = 'ok') "
        "FROM switchboard.{table} WHERE tier = 'bench' "
        f"AND ts BETWEEN fromUnixTimestamp64Milli({int(start * 1000)}) "
        f"AND fromUnixTimestamp64Milli({int(end * 1000) + 1})"
    ).result_rows[0]
    out[key] = dict(zip(["attempts", "ok", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms"], row))
print(json.dumps(out))
"""


def worker_calls(
    directory: Path, rates: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The worker's model calls during each Switchboard step, from its attempt rows: how many,
    and its own time to first token (request sent → first content parsed), by a fresh process
    (chDB opens a directory in one process only)."""
    windows = {
        rate: row["switchboard"]["window"]
        for rate, row in rates.items()
        if "window" in row["switchboard"]
    }
    if not windows:
        return {}
    out = subprocess.run(
        [
            python(),
            "-c",
            _CALLS.replace("{table}", EVENTS_TABLE),
            str(directory / "chdb"),
            json.dumps(windows),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    calls: dict[str, dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    for figures in calls.values():
        for key in ("ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms"):
            value = figures[key]
            figures[key] = None if value is None or value != value else round(value, 3)
    return calls


# --- figures --------------------------------------------------------------------------------------


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _healthy(r: Mapping[str, Any]) -> bool:
    return r.get("error_rate") is not None and r["error_rate"] < SUSTAINED


def summarise(
    plan: Plan,
    rates: Mapping[str, Mapping[str, Any]],
    primed: Mapping[str, Any],
    hop: Mapping[str, Any],
    calls: Mapping[str, Mapping[str, Any]],
    shape: LatencyProfile,
) -> dict[str, Any]:
    figures = sweep_figures(rates, TARGETS)  # on whole answers: sustained and stable rates
    ttft_overhead = {
        rate: {
            name: {
                "p50_ms": _diff(row[name].get("ttft_p50_ms"), row["direct"].get("ttft_p50_ms")),
                "p99_ms": _diff(row[name].get("ttft_p99_ms"), row["direct"].get("ttft_p99_ms")),
            }
            for name in TARGETS
            if name != "direct"
        }
        for rate, row in rates.items()
    }
    return {
        "profile": {"name": MODEL, **PROFILE, "tokens_per_chunk": shape.tokens_per_chunk},
        "nominal_total_ms": round(shape.nominal_total_s * 1000, 1),
        "rate_list": list(plan.rates),
        "duration_s": plan.duration_s,
        "warmup_s": plan.warmup_s,
        "prime": {"rps": PRIME_RPS, "duration_s": plan.prime_s, "results": dict(primed)},
        "timeout_s": TIMEOUT_S,
        "quick": plan.rates == QUICK_RATES,
        "rates": dict(rates),
        "ttft_overhead_ms": ttft_overhead,
        "total_overhead_ms": figures.pop("overhead_ms"),
        **figures,
        "kafka_hop": dict(hop),
        "worker_calls": dict(calls),
        "worker_chunks": worker_chunks(rates, plan),
        "ttft_parts": ttft_parts(rates, hop, calls),
        "goal": goal(rates, ttft_overhead),
    }


def worker_chunks(rates: Mapping[str, Mapping[str, Any]], plan: Plan) -> dict[str, Any]:
    """Per rate, what the one worker carried: chunk records per second (the measured answers'
    chunk events over the measured seconds), its cores and CPU per chunk and per answer over the
    step, and how many provider chunks made one Switchboard chunk."""
    out: dict[str, Any] = {}
    for rate, row in rates.items():
        sb, direct = row["switchboard"], row["direct"]
        if "skipped" in sb:
            continue
        chunks = sb["chunks_total"]
        step_chunks = chunks + sb.get("warmup_chunks", 0)
        cpu_s = (sb.get("cpu_s") or {}).get(WORKER)
        answers = sb["sent"] + round(int(rate) * plan.warmup_s)
        provider = direct.get("chunks_per_answer") if "skipped" not in direct else None
        ours = sb.get("chunks_per_answer")
        out[rate] = {
            "chunks_per_s": round(chunks / plan.duration_s, 1),
            # what came into the worker from the provider, at the same answers per second
            "provider_chunks_per_s": (
                round(provider * sb["sent"] / plan.duration_s, 1) if provider else None
            ),
            "chunks_per_answer": ours,
            "events_per_answer": sb.get("events_per_answer"),
            "provider_chunks_per_answer": provider,
            "provider_content_per_answer": direct.get("content_per_answer"),
            "content_per_answer": sb.get("content_per_answer"),
            "coalescing_ratio": round(provider / ours, 3) if provider and ours else None,
            "worker_cores": (sb.get("cores_busy") or {}).get(WORKER),
            "cpu_ms_per_chunk": (
                round(cpu_s * 1000 / step_chunks, 3) if cpu_s is not None and step_chunks else None
            ),
            "cpu_ms_per_answer": round(cpu_s * 1000 / answers, 3) if cpu_s is not None else None,
            "gap_max_p99_ms": sb.get("gap_max_p99_ms"),
            "provider_gap_max_p99_ms": direct.get("gap_max_p99_ms"),
        }
    return out


def ttft_parts(
    rates: Mapping[str, Mapping[str, Any]],
    hop: Mapping[str, Any],
    calls: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Switchboard's TTFT overhead (p50) split into what was measured of it: the model call's own
    TTFT inside the worker beyond direct's, two Kafka hops (measured alone), and the rest (router
    and worker work, queueing). Medians do not add exactly; the parts are the medians' gaps."""
    out: dict[str, Any] = {}
    two_hops = round(2 * hop["hop_p50_ms"], 3)
    for rate, row in rates.items():
        sb, direct = row["switchboard"], row["direct"]
        if "skipped" in sb or "skipped" in direct:
            continue
        overhead = _diff(sb.get("ttft_p50_ms"), direct.get("ttft_p50_ms"))
        worker_ttft = (calls.get(rate) or {}).get("ttft_p50_ms")
        call = _diff(worker_ttft, direct.get("ttft_p50_ms"))
        outside = _diff(sb.get("ttft_p50_ms"), worker_ttft)
        parts = {
            "model_call_in_worker": call,
            "kafka_two_hops": two_hops,
            "rest": _diff(outside, two_hops),
        }
        known = {k: v for k, v in parts.items() if v is not None}
        out[rate] = {
            "overhead_p50_ms": overhead,
            "switchboard_ttft_p50_ms": sb.get("ttft_p50_ms"),
            "direct_ttft_p50_ms": direct.get("ttft_p50_ms"),
            "worker_ttft_p50_ms": worker_ttft,
            "outside_call_ms": outside,
            **parts,
            "dominant": max(known, key=lambda k: known[k]) if known else None,
            # the CPU around those parts: a full machine makes every process's queue longer
            "machine_cores": sb["machine_cores"],
            "other_cores": sb["other_cores"],
            "cores_busy": dict(sb["cores_busy"]),
            "cpu_ms_per_answer": round(sum(sb["cpu_ms_per_request"].values()), 2),
        }
    return out


def goal(
    rates: Mapping[str, Mapping[str, Any]], overhead: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The issue's goal: met (True/False) or not measured (None, a quick run)."""
    key = str(GOAL_RATE)
    out: dict[str, Any] = {"rate": GOAL_RATE, "limit_ms": GOAL_P50_MS}
    if key not in rates or "skipped" in rates[key]["switchboard"]:
        return {**out, "overhead_p50_ms": None, "met": None}
    value = overhead[key]["switchboard"]["p50_ms"]
    met = _healthy(rates[key]["switchboard"]) and value is not None and value <= GOAL_P50_MS
    return {**out, "overhead_p50_ms": value, "met": met}


# --- report ---------------------------------------------------------------------------------------


def _ttft_cell(r: Mapping[str, Any]) -> tuple[str, str]:
    if "skipped" in r:
        return "not run", "-"
    errors = f"{r['errors']}/{r['sent']}"
    if r["errors"]:
        errors += f" ({r['error_rate']:.1%})"
    mark = "" if r["generator_kept_up"] else " ⚠"
    if r["other_cores"] >= NOISY_CORES:
        mark += " *"
    return f"{fmt(r.get('ttft_p50_ms'))} / {fmt(r.get('ttft_p99_ms'))}{mark}", errors


def ttft_table(rates: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "| RPS | " + " | ".join(f"{LABELS[t]} TTFT p50 / p99 | errors" for t in TARGETS) + " |",
        "|---:|" + "---:|---:|" * len(TARGETS),
    ]
    for rate, row in rates.items():
        cells = [c for t in TARGETS for c in _ttft_cell(row[t])]
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    return lines


def goal_line(data: Mapping[str, Any]) -> str:
    g = data["goal"]
    head = f"**Goal: TTFT overhead p50 ≤ {g['limit_ms']:g} ms at {g['rate']} RPS: "
    if g["met"] is None:
        return (
            head + f"not measured** (this run drove {', '.join(map(str, data['rate_list']))} RPS)."
        )
    sb = data["rates"][str(g["rate"])]["switchboard"]
    errors = f", with {sb['error_rate']:.1%} errors" if sb["errors"] else ""
    return head + f"{'yes' if g['met'] else 'no'}** ({fmt(g['overhead_p50_ms'])} ms{errors})."


def chunks_table(data: Mapping[str, Any]) -> list[str]:
    chunks: Mapping[str, Mapping[str, Any]] = data["worker_chunks"]
    lines = [
        "| RPS | provider chunks/s in | chunks/s out | worker cores | worker CPU ms / chunk | worker CPU ms / answer | "
        "provider chunks / answer (with content) | Switchboard chunks / answer (with content) | "
        "coalescing ratio | "
        "longest pause in an answer p99, direct / Switchboard (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rate, c in chunks.items():
        lines.append(
            f"| {rate} | {fmt(c['provider_chunks_per_s'])} | {fmt(c['chunks_per_s'])} | "
            f"{fmt(c['worker_cores'], 2)} | "
            f"{fmt(c['cpu_ms_per_chunk'], 3)} | {fmt(c['cpu_ms_per_answer'], 2)} | "
            f"{fmt(c['provider_chunks_per_answer'], 2)} ({fmt(c['provider_content_per_answer'], 2)}) | "
            f"{fmt(c['chunks_per_answer'], 2)} ({fmt(c['content_per_answer'], 2)}) | "
            f"{fmt(c['coalescing_ratio'], 2)} | {fmt(c['provider_gap_max_p99_ms'])} / "
            f"{fmt(c['gap_max_p99_ms'])} |"
        )
    return lines


PART_WORDS = {
    "model_call_in_worker": "the model call inside the worker (its TTFT minus direct's)",
    "kafka_two_hops": "two Kafka hops (one measured alone, doubled)",
    "rest": "the router's and the worker's own work and queues (the rest)",
}


def parts_table(data: Mapping[str, Any]) -> list[str]:
    parts: Mapping[str, Mapping[str, Any]] = data["ttft_parts"]
    lines = [
        "| RPS | Switchboard TTFT p50 | direct TTFT p50 | overhead | worker's model-call TTFT "
        "p50 | model call in worker minus direct | two Kafka hops | rest |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rate, p in parts.items():
        lines.append(
            f"| {rate} | {fmt(p['switchboard_ttft_p50_ms'])} | {fmt(p['direct_ttft_p50_ms'])} | "
            f"{fmt(p['overhead_p50_ms'])} | {fmt(p['worker_ttft_p50_ms'])} | "
            f"{fmt(p['model_call_in_worker'])} | {fmt(p['kafka_two_hops'])} | "
            f"{fmt(p['rest'])} |"
        )
    return lines


def limit_words(data: Mapping[str, Any], rate: str) -> str:
    """One sentence naming the largest measured part of the overhead at ``rate``."""
    p = data["ttft_parts"].get(rate)
    if not p or p["dominant"] is None:
        return f"The overhead's parts were not measured at {rate} RPS."
    top = p["dominant"]
    others = [
        f"{PART_WORDS[k]} {fmt(p[k])} ms" for k in PART_WORDS if k != top and p[k] is not None
    ]
    busiest = sorted(p["cores_busy"].items(), key=lambda kv: -kv[1])[:3]
    return (
        f"At {rate} RPS the largest measured part of the {fmt(p['overhead_p50_ms'])} ms TTFT "
        f"overhead (p50) is {PART_WORDS[top]}, {fmt(p[top])} ms"
        + (f"; the others: {', '.join(others)}" if others else "")
        + f". During that step the machine used {p['machine_cores']:.2f} of {CORES} cores "
        f"({p['other_cores']:.2f} outside this benchmark); Switchboard's processes used "
        f"{p['cpu_ms_per_answer']:.1f} ms CPU per answer (idle polling included), its busiest "
        + ", ".join(f"{n} {c:.2f}" for n, c in busiest)
        + " cores."
    )


def markdown(data: Mapping[str, Any]) -> str:
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    p = data["profile"]
    hop = data["kafka_hop"]
    lines = [
        "## Streaming: time to first token, direct vs Switchboard vs LiteLLM proxy",
        "",
        f"Open-loop streamed requests (`bench.loadgen --stream`: `stream: true` with "
        f"`include_usage`, the answer read as server-sent events), {data['duration_s']:g} s "
        f"measured per step after {data['warmup_s']:g} s warm-up; each target primed "
        f"{data['prime']['duration_s']:g} s at {data['prime']['rps']} RPS. TTFT runs from each "
        "request's scheduled send time to the arrival of the first event whose delta carries "
        "content; total from the scheduled time to the end of the answer. An error is a non-200, "
        "an error event, an answer without `[DONE]` or without content, a connection failure, or "
        f"no end {data['timeout_s']:g} s after the scheduled time; percentiles over the "
        f"successful answers. Upstream: simulator profile `{p['name']}`, ttft {p['ttft_s']} s, "
        f"{p['tokens_per_s']:g} tokens/s, {p['output_tokens']} tokens in chunks of "
        f"{p['tokens_per_chunk']} (one every 30 ms), no jitter: first content at "
        f"{p['ttft_s'] * 1000 + p['tokens_per_chunk'] / p['tokens_per_s'] * 1000:g} ms, the "
        f"whole answer in {data['nominal_total_ms']:g} ms. Switchboard: one router, one worker "
        f"(tier concurrency {data['switchboard']['tier_concurrency']}), metrics, Tansu, Redis, "
        f"reply topics in generations of {data['switchboard']['reply_generation_size']} requests "
        f"as `switchboard up` runs them; model `{data['switchboard']['model']}`. "
        + proxy_words(data),
        "",
        "TTFT p50 / p99 in ms; errors as failed/sent. ⚠: the generator fell behind its schedule. "
        f"*: programs outside this benchmark used ≥ {NOISY_CORES} cores during the step.",
        "",
        *ttft_table(rates),
        "",
        "TTFT overhead over direct (target minus direct, ms):",
        "",
        *overhead_table(data["ttft_overhead_ms"], TARGETS, LABELS),
        "",
        goal_line(data),
        "",
        "The whole answer, p50 / p99 in ms:",
        "",
        *latency_table(rates, TARGETS, LABELS),
        "",
        "Through the one worker (`worker-bench`): provider chunks per second into it (the "
        "simulator's chunks per answer times Switchboard's answers per second) and chunk records "
        "per second out of it (the chunk events the measured answers carried to the clients, over "
        "the measured seconds); its cores, and its "
        "CPU over the step (warm-up included) per chunk and per answer; provider chunks per answer "
        "(events with choices straight from the simulator: role, content, finish) against "
        "Switchboard's; and the longest pause between two events of one answer after its first "
        "content:",
        "",
        *chunks_table(data),
        "",
        "What the TTFT overhead is made of (p50, ms): the worker's own TTFT of its model call "
        "(request sent → first content parsed, from its attempt rows in the metrics store) beside "
        "direct's; one Kafka hop measured alone before the sweep "
        f"({hop['samples']} messages one at a time, acks=all, fetch wait {hop['fetch_wait_ms']} "
        f"ms: p50 {hop['hop_p50_ms']} ms, p99 {hop['hop_p99_ms']} ms), twice, as a first token "
        "crosses the tier topic then the reply topic; the rest is Switchboard's TTFT minus the "
        "worker's TTFT minus the two hops: the router's and the worker's own work and their "
        "queues. Medians do not add exactly.",
        "",
        *parts_table(data),
        "",
        sustained_line(data, TARGETS, LABELS) + " (on the whole answer's p99)",
        "",
        *resource_table(data),
        "",
        verdict(data),
    ]
    return "\n".join(lines) + "\n"


def verdict(data: Mapping[str, Any]) -> str:
    """What limits the overhead, from the figures, then each target's limit, noise and lag."""
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    parts = [goal_line(data).replace("**", "")]
    key = str(GOAL_RATE)
    for rate in (key, *sorted((r for r in data["ttft_parts"] if r != key), key=int)):
        if rate in data["ttft_parts"]:
            parts.append(limit_words(data, rate))
    for rate, row in rates.items():
        sb = row["switchboard"]
        if "skipped" not in sb and sb["errors"]:
            kinds = ", ".join(f"{k} {v}" for k, v in sb["error_kinds"].items())
            parts.append(f"Switchboard's errors at {rate} RPS: {kinds}.")
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
    if data["generator_lagged"]:
        parts.append(
            "The generator fell behind its schedule in "
            + ", ".join(data["generator_lagged"])
            + " (the lag is inside those latencies)."
        )
    return " ".join(p for p in parts if p)
