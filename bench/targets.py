"""The issue's performance targets, checked against a run's figures.

Targets are goals the report compares against, never assertions: a run that misses one still
succeeds. Where a target is missed, ``limit`` says what the run itself measured as the limit
(CPU per unit of work against the cores there are), so every verdict is backed by a figure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measure: Callable[[dict[str, Any]], float]
    met: Callable[[float], bool]
    limit: Callable[[dict[str, Any]], str]
    unit: str = ""


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        data = data[key]
    return data


def _shadow_spread(shares: list[dict[str, Any]]) -> float:
    """At 10 % the extra per request (about 0.1 ms) is the size of the tier's worker's
    burst-to-burst spread, so only the shares where it stands out are judged."""
    per_mirror = [r["extra_cpu_ms_per_mirror"] for r in shares if r["share_pct"] >= 50]
    mean = sum(per_mirror) / len(per_mirror)
    if mean <= 0:
        return 99.0  # no extra cost measured at all: noise, not proportionality
    return round((max(per_mirror) - min(per_mirror)) / mean, 2)


def _ceiling(cpu_ms: float) -> str:
    if cpu_ms <= 0:
        return "no CPU figure"
    return f"{cpu_ms:.2f} ms CPU each → at most {1000 / cpu_ms:,.0f}/s per core"


def _sync_limit(d: dict[str, Any]) -> str:
    detail = d["sync"]["detail"]
    cpu = detail.get("cpu_ms_per_request") or {}
    total = sum(cpu.values())
    parts = ", ".join(f"{k} {v}" for k, v in cpu.items())
    hop = detail.get("kafka_hop") or {}
    floor = (
        f"two Kafka hops at p50 {hop['hop_p50_ms']} ms each on this broker (measured alone)"
        if hop
        else "two Kafka hops"
    )
    rate = detail.get("cpu_ms_per_request_rps")
    cpu_part = (
        f"; {total:.1f} ms CPU per request at {rate} RPS ({parts}) on {CORES} cores shared with "
        f"the simulator and the load generator → at most {CORES * 1000 / total:,.0f} RPS"
        if total
        else ""
    )
    return floor + cpu_part


def _stream_limit(d: dict[str, Any]) -> str:
    """The measured parts of the streamed TTFT overhead at 100 RPS, largest first."""
    parts = d["stream"]["ttft_parts"]["100"]
    words = {
        "kafka_two_hops": "two Kafka hops (measured alone)",
        "rest": "router and worker work and queues",
        "model_call_in_worker": "the model call inside the worker beyond direct's TTFT",
    }
    known = sorted(
        ((k, parts[k]) for k in words if parts.get(k) is not None), key=lambda kv: -kv[1]
    )
    machine = (
        f"; the machine used {parts['machine_cores']:.2f} of {CORES} cores in that step "
        f"({parts['other_cores']:.2f} outside the benchmark), Switchboard's processes "
        f"{parts['cpu_ms_per_answer']:.1f} ms CPU per answer"
        if "machine_cores" in parts
        else ""
    )
    return "; ".join(f"{words[k]} {v:.1f} ms" for k, v in known) + machine


def _worker_limit(d: dict[str, Any]) -> str:
    w = d["worker"]
    return (
        f"worker {_ceiling(w['cpu_ms_per_call'])}; the simulator needs "
        f"{w['simulator_cpu_ms_per_call']} ms per call on the same {CORES} cores"
    )


def _router_limit(d: dict[str, Any]) -> str:
    r = d["router"]
    return f"router {_ceiling(r['cpu_ms_per_decision'])}"


def _metrics_limit(d: dict[str, Any]) -> str:
    m = d["metrics"]
    return f"metrics {_ceiling(m['cpu_us_per_event'] / 1000)}"


def _jobs_limit(d: dict[str, Any]) -> str:
    cpu = d["jobs"]["cpu_ms_per_job"]
    total = sum(cpu.values())
    parts = ", ".join(f"{k} {v}" for k, v in cpu.items())
    return (
        f"{total:.1f} ms CPU per job across processes ({parts}) on {CORES} cores → "
        f"at most {CORES * 1000 / total:,.0f} jobs/s"
        if total
        else "no CPU figure"
    )


def _rss_limit(name: str) -> Callable[[dict[str, Any]], str]:
    return lambda d: f"{name} RSS measured under load"


def _metrics_rss_limit(d: dict[str, Any]) -> str:
    alone = d["metrics"].get("store_alone_rss_mb")
    if not alone:
        return "metrics RSS measured under load"
    return (
        f"the embedded ClickHouse: a bare process doing the same inserts into chDB, no Kafka, "
        f"holds {alone['opened_mb']} MB once the store is open and {alone['peak_mb']} MB at "
        "peak; with a ClickHouse server that memory is the server's"
    )


TARGETS = [
    Target(
        "sync overhead p50 at 200 RPS",
        "≤ 10 ms",
        lambda d: _get(d, "sync", "detail", "overhead_ms", "200", "switchboard", "p50_ms"),
        lambda v: v <= 10,
        _sync_limit,
        " ms",
    ),
    Target(
        "sync overhead p99 at 200 RPS",
        "≤ 30 ms",
        lambda d: _get(d, "sync", "detail", "overhead_ms", "200", "switchboard", "p99_ms"),
        lambda v: v <= 30,
        _sync_limit,
        " ms",
    ),
    Target(
        "sync p99 at 200 RPS, Switchboard minus LiteLLM proxy (1 process)",
        "< 0 ms",
        lambda d: (
            _get(d, "sync", "200", "switchboard", "p99_ms")
            - _get(d, "sync", "200", "litellm", "p99_ms")
        ),
        lambda v: v < 0,
        _sync_limit,
        " ms",
    ),
    Target(
        f"sync p99 at 200 RPS, Switchboard minus LiteLLM proxy ({CORES} workers)",
        "< 0 ms",
        lambda d: (
            _get(d, "sync", "200", "switchboard", "p99_ms")
            - _get(d, "sync", "200", "litellm_workers", "p99_ms")
        ),
        lambda v: v < 0,
        _sync_limit,
        " ms",
    ),
    Target(
        "stream TTFT overhead p50 at 100 RPS",
        "≤ 15 ms",
        lambda d: _get(d, "stream", "ttft_overhead_ms", "100", "switchboard", "p50_ms"),
        lambda v: v <= 15,
        _stream_limit,
        " ms",
    ),
    Target(
        "one worker, calls/s",
        "≥ 1,000",
        lambda d: _get(d, "worker", "calls_per_s"),
        lambda v: v >= 1000,
        _worker_limit,
    ),
    Target(
        "one worker, CPU per call",
        "≤ 1 ms",
        lambda d: _get(d, "worker", "cpu_ms_per_call"),
        lambda v: v <= 1,
        _worker_limit,
        " ms",
    ),
    Target(
        "router decisions/s",
        "≥ 20,000",
        lambda d: _get(d, "router", "decisions_per_s"),
        lambda v: v >= 20_000,
        _router_limit,
    ),
    Target(
        "rule decision p99",
        "≤ 100 µs",
        lambda d: _get(d, "router", "rule_p99_us"),
        lambda v: v <= 100,
        lambda d: "pure Python rule evaluation",
        " µs",
    ),
    Target(
        "semantic stage decision p50, batch 1",
        "≤ 10 ms",
        lambda d: _get(d, "semantic", "decision", "on_p50_ms"),
        lambda v: v <= 10,
        lambda d: (
            f"the encoder: {_get(d, 'semantic', 'encoder_batches', '1', 'ms_per_text')} ms per "
            "text at batch 1, one thread"
        ),
        " ms",
    ),
    Target(
        "router CPU per request, canary on vs off",
        "< +5 %",
        lambda d: _get(d, "router", "experiments", "canary_extra_pct"),
        lambda v: v < 5,
        lambda d: (
            f"ingress path {d['router']['experiments']['ingress_us_canary']} µs with the canary, "
            f"{d['router']['experiments']['ingress_us_off']} µs without"
        ),
        " %",
    ),
    Target(
        "worker CPU per call, canary on vs off",
        "< +5 %",
        lambda d: _get(d, "worker", "experiments", "canary_extra_pct"),
        lambda v: v < 5,
        lambda d: (
            f"{d['worker']['experiments']['cpu_ms_per_call_canary']} ms with the canary, "
            f"{d['worker']['experiments']['cpu_ms_per_call_off']} ms without"
        ),
        " %",
    ),
    Target(
        "shadow's extra CPU per mirrored request at 50 and 100 %: (largest - smallest) ÷ mean",
        "≤ 0.5 (its cost follows the share)",
        lambda d: _shadow_spread(_get(d, "worker", "experiments", "shadow", "shares")),
        lambda v: v <= 0.5,
        lambda d: (
            "extra ms per mirror: "
            + ", ".join(
                f"{r['extra_cpu_ms_per_mirror']} at {r['share_pct']} %"
                for r in d["worker"]["experiments"]["shadow"]["shares"][1:]
            )
            + " (10 %: shown, not judged; bench/worker.py)"
        ),
    ),
    Target(
        "metrics events/s",
        "≥ 200,000",
        lambda d: _get(d, "metrics", "events_per_s"),
        lambda v: v >= 200_000,
        _metrics_limit,
    ),
    Target(
        "async jobs/s",
        "≥ 5,000",
        lambda d: _get(d, "jobs", "jobs_per_s"),
        lambda v: v >= 5000,
        _jobs_limit,
    ),
    Target(
        "async jobs completed",
        "100%",
        lambda d: 100 * _get(d, "jobs", "completed") / _get(d, "jobs", "count"),
        lambda v: v >= 100,
        lambda d: (
            f"{d['jobs']['count'] - d['jobs']['completed']} jobs without a result "
            f"(errors by code: {d['jobs']['error_codes']}; unanswered: "
            f"{d['jobs']['count'] - d['jobs']['answered']})"
        ),
        "%",
    ),
    Target(
        "RSS worker (1,000 in flight)",
        "≤ 300 MB",
        lambda d: _get(d, "rss_mb", "worker"),
        lambda v: v <= 300,
        _rss_limit("worker"),
        " MB",
    ),
    Target(
        "RSS router (under load)",
        "≤ 250 MB",
        lambda d: _get(d, "rss_mb", "router"),
        lambda v: v <= 250,
        _rss_limit("router"),
        " MB",
    ),
    Target(
        "RSS metrics (under load)",
        "≤ 500 MB",
        lambda d: _get(d, "rss_mb", "metrics"),
        lambda v: v <= 500,
        _metrics_rss_limit,
        " MB",
    ),
]


def evaluate(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per target whose scenario ran: measured value, met or not, and the limit."""
    out = []
    for t in TARGETS:
        try:
            value = float(t.measure(data))
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        met = t.met(value)
        try:
            limit = "" if met else t.limit(data)
        except (KeyError, TypeError, ZeroDivisionError):
            limit = ""
        out.append(
            {
                "target": t.name,
                "goal": t.goal,
                "measured": round(value, 3),
                "unit": t.unit.strip(),
                "met": met,
                "limit": limit,
            }
        )
    return out


def targets_markdown(verdicts: list[dict[str, Any]]) -> str:
    lines = [
        "## Targets",
        "",
        "| target | goal | measured | met | what limits it (measured in this run) |",
        "|---|---|---:|:---:|---|",
    ]
    for v in verdicts:
        unit = f" {v['unit']}" if v["unit"] else ""
        lines.append(
            f"| {v['target']} | {v['goal']} | {v['measured']:,}{unit} | "
            f"{'yes' if v['met'] else 'no'} | {v['limit']} |"
        )
    return "\n".join(lines)
