"""Scenario ``sync_light``: the sync path on the model `make up`'s fast tier calls first,
``sim-light`` (about 0.8 s a call), where a worker's concurrency rather than its CPU decides the
queueing.

Little's law: at R requests/s of calls lasting T s a worker holds R * T calls open on average, so
a tier concurrency of C queues requests once R * T nears C, and bursts queue before that. Five
targets answer the same request from the same simulated model: the simulator itself (*direct*),
Switchboard with the tier at each concurrency of ``CONCURRENCY`` (one router, one worker per
value, each worker on its own tier), and the LiteLLM proxy as one process and with one worker
per core. ``bench.loadgen`` drives each at 50 and 80 RPS, back to back at every rate, with the
same plan, generator and collapse rules as ``bench.sync``.

During each Switchboard step the worker's TCP connections are counted every half second: to the
simulator (its HTTP pool holds at most the tier's concurrency, so a count at the limit means
calls waited for a slot) and to Redis (the outcome store's blocking pool of 64 opens a connection
only when every open one is busy, so the count is the most Redis commands it had in flight at
once; under 64, the pool never made a call wait).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import psutil

from bench.common import (
    ROOT,
    Bench,
    ProcSampler,
    RunningStack,
    Section,
    process_tree,
    start_stack,
    tier_spec,
    write_config,
)
from bench.litellm_proxy import LiteLLMProxy
from bench.sync import (
    LABELS,
    NOISY_CORES,
    PEERS,
    PRIME_RPS,
    TIMEOUT_S,
    Plan,
    Target,
    body_file,
    child_named,
    fmt,
    idle_load,
    latency_table,
    overhead_table,
    proxy_targets,
    proxy_words,
    start_proxies,
    sustained_line,
    sweep,
    sweep_figures,
    usage_of,
)
from services.common.routing_config import TierSpec, load_config
from services.simulator.profiles import BUILTIN_PROFILES

MODEL = "sim-light"
DEFAULT_CONCURRENCY: int = TierSpec.model_fields["concurrency"].default
# The default beside a quarter of it, so that the report shows what the default buys.
CONCURRENCY = (DEFAULT_CONCURRENCY // 4, DEFAULT_CONCURRENCY)
FULL_RATES = (50, 80)
QUICK_RATES = (20,)
# The simulated call's own limits, as `make up`'s fast tier sets them.
TIER_TIMEOUT_S = 10
CONN_SAMPLE_S = 0.5


def tier_name(concurrency: int) -> str:
    return f"light-c{concurrency}"


def target_name(concurrency: int) -> str:
    return f"switchboard_c{concurrency}"


def labels() -> dict[str, str]:
    return {
        **LABELS,
        **{target_name(c): f"Switchboard, concurrency {c}" for c in CONCURRENCY},
    }


def names(peers: bool = True) -> tuple[str, ...]:
    """The targets in report order; ``peers``: the LiteLLM proxies too (not in a quick run,
    whose sync scenario already starts and drives both)."""
    return ("direct", *(target_name(c) for c in CONCURRENCY), *(PEERS if peers else ()))


class ConnectionPeaks:
    """The most TCP connections ``pid`` held to each of ``ports`` while it ran, sampled."""

    def __init__(self, pid: int, ports: Mapping[str, int]) -> None:
        self.proc = psutil.Process(pid)
        self.ports = dict(ports)
        self.peak = dict.fromkeys(self.ports, 0)
        self._running = True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            open_ = [c for c in self.proc.net_connections("tcp") if c.raddr]
            for name, port in self.ports.items():
                count = sum(1 for c in open_ if c.raddr.port == port)
                self.peak[name] = max(self.peak[name], count)

    def _poll(self) -> None:
        while self._running:
            self._sample()
            time.sleep(CONN_SAMPLE_S)

    def stop(self) -> dict[str, Any]:
        self._running = False
        self._thread.join()
        self._sample()
        return {"connections_peak": dict(self.peak)}


def _observer(pid: int, ports: Mapping[str, int]) -> Callable[[], Callable[[], dict[str, Any]]]:
    return lambda: ConnectionPeaks(pid, ports).stop


def _port(url: str) -> int:
    return int(urlparse(url if "://" in url else f"tcp://{url}").port or 0)


def make_targets(
    bench: Bench,
    sim_url: str,
    sim_pid: int,
    stack: RunningStack,
    extra_stack: Mapping[str, int],
    proxies: Mapping[str, LiteLLMProxy],
) -> dict[str, Target]:
    ports = {"simulator": _port(sim_url), "redis": _port(stack.redis_url)}
    shared = {n: stack.pid(n) for n in ("router", "metrics")}
    targets = {
        "direct": Target(
            "direct",
            f"{sim_url}/v1/chat/completions",
            body_file(bench, "direct-light", MODEL),
            procs={"simulator": sim_pid},
        )
    }
    for c in CONCURRENCY:
        worker = f"worker-{tier_name(c)}"
        targets[target_name(c)] = Target(
            target_name(c),
            f"{stack.base_url}/v1/chat/completions",
            body_file(bench, target_name(c), tier_name(c)),
            {"authorization": f"Bearer {stack.api_key}"},
            procs={**shared, worker: stack.pid(worker), **extra_stack},
            observe=_observer(stack.pid(worker), ports),
        )
    return {**targets, **proxy_targets(bench, proxies, MODEL)}


def fast_tier_concurrency() -> int | None:
    """The concurrency `make up` gives its fast tier (config/simulated.yaml), or None."""
    with contextlib.suppress(Exception):
        return load_config(ROOT / "config" / "simulated.yaml").spec.tiers["fast"].concurrency
    return None


def run(bench: Bench) -> Section:
    plan = Plan.for_bench(bench)
    plan = Plan(
        QUICK_RATES if bench.quick else FULL_RATES,
        plan.duration_s,
        warmup_s=plan.warmup_s,
        prime_s=plan.prime_s,
        settle_s=plan.settle_s,
        idle_s=plan.idle_s,
    )
    profile = BUILTIN_PROFILES[MODEL]
    with bench.scope():
        sim_url = bench.simulator()
        sim = child_named(bench, "simulator-")
        peers = not bench.quick
        # the proxies boot while the stack starts
        proxies = start_proxies(bench, sim_url, [MODEL]) if peers else {}
        bootstrap = bench.broker()
        broker = child_named(bench, "broker")
        redis_url = bench.redis()
        redis = child_named(bench, "redis")
        tiers = {
            tier_name(c): tier_spec(sim_url, MODEL, concurrency=c, timeout_s=TIER_TIMEOUT_S)
            for c in CONCURRENCY
        }
        config = write_config(bench.work_dir / "sync-light.yaml", tiers, tier_name(CONCURRENCY[0]))
        stack = start_stack(
            bench, config, bootstrap=bootstrap, redis_url=redis_url, tiers=list(tiers)
        )
        for proxy in proxies.values():
            proxy.wait_ready()
        extra = {"broker": broker.pid, "redis": redis.pid}
        by_name = make_targets(bench, sim_url, sim.pid, stack, extra, proxies)
        watched = {n: pid for t in by_name.values() for n, pid in t.procs.items()}
        samplers = {n: ProcSampler(process_tree(pid)).start() for n, pid in watched.items()}
        idle = idle_load(watched, plan.idle_s)
        t0 = time.perf_counter()
        prompt_s = 2 * profile.nominal_total_s
        try:
            rates, primed = sweep(by_name, plan, watched, prompt_s=prompt_s, always_rate=None)
        finally:
            processes = usage_of(samplers)
        data: dict[str, Any] = {
            "profile": {"name": MODEL, **profile.model_dump(mode="json")},
            "nominal_latency_ms": round(profile.nominal_total_s * 1000, 1),
            "rate_list": list(plan.rates),
            "duration_s": plan.duration_s,
            "warmup_s": plan.warmup_s,
            "prime": {"rps": PRIME_RPS, "duration_s": plan.prime_s, "results": primed},
            "timeout_s": TIMEOUT_S,
            "quick": bench.quick,
            "rates": rates,
            **sweep_figures(rates, names(peers)),
            "peers": peers,
            "concurrency": list(CONCURRENCY),
            "default_concurrency": DEFAULT_CONCURRENCY,
            "fast_tier_concurrency": fast_tier_concurrency(),
            "mean_calls_open": {
                rate: round(int(rate) * row["direct"]["p50_ms"] / 1000, 1)
                for rate, row in rates.items()
                if row["direct"].get("p50_ms") is not None
            },
            "idle": idle,
            "sweep_s": round(time.perf_counter() - t0, 1),
            "processes": processes,
            "litellm_proxy": proxies["litellm"].settings if peers else None,
            "litellm_proxies": {name: proxy.settings for name, proxy in proxies.items()},
            "switchboard": {"tiers": list(tiers), "config": config.read_text()},
        }
    return Section(key="sync_light", data=data, markdown=markdown(data))


# --- report ---------------------------------------------------------------------------------------


def markdown(data: Mapping[str, Any]) -> str:
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    p = data["profile"]
    label, order = labels(), names(data["peers"])
    lines = [
        f"## Sync on `{p['name']}` (`make up`'s fast tier): tier concurrency, and the LiteLLM "
        "proxy on equal cores",
        "",
        f"As the sync scenario (same generator, {data['duration_s']:g} s measured per step after "
        f"{data['warmup_s']:g} s warm-up, primed {data['prime']['duration_s']:g} s at "
        f"{data['prime']['rps']} RPS, {data['timeout_s']:g} s timeout), with the simulator's "
        f"built-in profile `{p['name']}`: ttft {p['ttft_s']} s, {p['tokens_per_s']:g} tokens/s, "
        f"{p['output_tokens']} tokens, ±{p['jitter']:.0%} jitter, "
        f"{data['nominal_latency_ms']:g} ms nominal. Switchboard: one router, metrics, Tansu, "
        "Redis, and one worker per tier concurrency ("
        + ", ".join(str(c) for c in data["concurrency"])
        + f"), each on its own tier of this one model; the tier default is "
        f"{data['default_concurrency']}, and `make up`'s fast tier runs "
        f"{data['fast_tier_concurrency']}. "
        + (proxy_words(data) if data["peers"] else "No LiteLLM proxy in a quick run."),
        "",
        "p50 / p99 in ms; errors as failed/sent. ⚠: the generator fell behind its schedule. "
        f"*: programs outside this benchmark used ≥ {NOISY_CORES} cores during the step.",
        "",
        *latency_table(rates, order, label),
        "",
        "Overhead over direct (target minus direct, ms):",
        "",
        *overhead_table(data["overhead_ms"], order, label),
        "",
        *connections_table(data),
        "",
        *cpu_table(data, order, label),
        "",
        sustained_line(data, order, label),
        "",
        verdict(data),
    ]
    return "\n".join(lines) + "\n"


def connections_table(data: Mapping[str, Any]) -> list[str]:
    """Calls open on average (Little's law) beside the most connections each worker held."""
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    conc: Sequence[int] = data["concurrency"]
    lines = [
        "Calls open on average (rate times direct p50, Little's law) beside the most connections "
        f"each worker held, sampled every {CONN_SAMPLE_S:g} s: to the simulator (at most the "
        "tier's concurrency) and to Redis (its pool holds at most 64):",
        "",
        "| RPS | calls open on average | "
        + " | ".join(f"concurrency {c}: simulator / Redis connections" for c in conc)
        + " |",
        "|---:|---:|" + "---:|" * len(conc),
    ]
    for rate, row in rates.items():
        cells = []
        for c in conc:
            peak = row[target_name(c)].get("connections_peak")
            cells.append("-" if not peak else f"{peak['simulator']} / {peak['redis']}")
        mean = data["mean_calls_open"].get(rate)
        lines.append(f"| {rate} | {fmt(mean)} | " + " | ".join(cells) + " |")
    return lines


def cpu_table(data: Mapping[str, Any], order: Sequence[str], label: Mapping[str, str]) -> list[str]:
    """CPU per request of each target's processes, and the machine's load, at every rate."""
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    lines = [
        "CPU ms per request of each target's own processes (Switchboard: router, its worker, "
        "metrics, broker, Redis; the proxy with its workers; warm-up included), and the cores "
        "the whole machine used during the step:",
        "",
        "| target | " + " | ".join(f"@{rate}: CPU ms/req, machine cores" for rate in rates) + " |",
        "|---|" + "---:|" * len(rates),
    ]
    for name in order:
        cells = []
        for row in rates.values():
            r = row[name]
            if "skipped" in r:
                cells.append("not run")
                continue
            cpu = sum((r.get("cpu_ms_per_request") or {}).values())
            cells.append(f"{cpu:.2f}, {r['machine_cores']:.2f}")
        lines.append(f"| {label[name]} | " + " | ".join(cells) + " |")
    return lines


def verdict(data: Mapping[str, Any]) -> str:
    """The concurrency comparison and the proxies at the highest rate, from the figures."""
    rates: Mapping[str, Mapping[str, Any]] = data["rates"]
    top = max(rates, key=int)
    row = rates[top]
    label = labels()
    parts = [
        f"At {top} RPS the simulator alone answered at p50 {fmt(row['direct']['p50_ms'])} ms, so "
        f"about {fmt(data['mean_calls_open'].get(top))} calls were open on average."
    ]
    cells = []
    for name in names(data["peers"])[1:]:
        r = row[name]
        if "skipped" in r:
            cells.append(f"{label[name]} not run ({r['skipped']})")
            continue
        over = data["overhead_ms"][top][name]
        errors = f", {r['error_rate']:.1%} errors" if r["errors"] else ""
        cells.append(
            f"{label[name]} p50 {fmt(r['p50_ms'])} / p99 {fmt(r['p99_ms'])} ms "
            f"(Δ {fmt(over['p50_ms'])} / {fmt(over['p99_ms'])}{errors})"
        )
    parts.append("; ".join(cells) + ".")
    lagged = data["generator_lagged"]
    if lagged:
        parts.append(f"The generator fell behind its schedule in {', '.join(lagged)}.")
    noisy = [
        f"{name}@{rate} ({r['other_cores']:.2f})"
        for rate, row in rates.items()
        for name, r in row.items()
        if "skipped" not in r and r["other_cores"] >= NOISY_CORES
    ]
    if noisy:
        parts.append(f"Programs outside this benchmark used CPU (cores) during {', '.join(noisy)}.")
    return " ".join(parts)
