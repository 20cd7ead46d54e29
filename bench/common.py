"""What every benchmark scenario shares: the machine record, percentiles, process sampling, and
starting the embedded parts (broker, Redis, provider simulator, our services) as child processes.

Every process a scenario starts is a ``switchboard.embedded.Child`` registered with the
``Bench`` context, so it is stopped when the scenario ends, whatever happens.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from switchboard.embedded import (
    Child,
    free_port,
    python_service,
    start_broker,
    start_redis,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def machine_info() -> dict[str, Any]:
    """Date and machine, written beside every result."""
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = _git("rev-parse", "--short", "HEAD").strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": socket.gethostname(),
        "cpu": cpu_model,
        "cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "commit": commit,
        "uncommitted": uncommitted_changes(),
    }


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    return ""


def uncommitted_changes() -> list[str]:
    """Tracked files that differ from the commit and can change a figure (tests, docs and
    results cannot), so a result is never credited to a commit that lacks its code."""
    paths = [
        line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()
    ]
    return [
        p
        for p in paths
        if not p.startswith(("tests/", "docs/", "bench/results/")) and not p.endswith(".md")
    ]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (``nan`` when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_summary(values_ms: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values_ms)
    return {
        "p50_ms": round(percentile(ordered, 50), 3),
        "p95_ms": round(percentile(ordered, 95), 3),
        "p99_ms": round(percentile(ordered, 99), 3),
    }


@dataclass
class CpuSample:
    cpu_s: float
    wall_s: float
    rss_mb_peak: float


class ProcSampler:
    """CPU seconds used and peak RSS of some processes between ``start()`` and ``stop()``.

    RSS is polled every ``interval_s`` from a background thread; CPU comes from the kernel's
    per-process counters (user + system, children excluded), so it is exact.
    """

    def __init__(self, pids: Iterable[int], interval_s: float = 0.2) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.interval_s = interval_s
        self._cpu0 = 0.0
        self._t0 = 0.0
        self._peak = 0.0
        self._running = False
        self._thread: Any = None

    def _cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_mb(self) -> float:
        total = 0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20

    def _poll(self) -> None:
        while self._running:
            self._peak = max(self._peak, self.rss_mb())
            time.sleep(self.interval_s)

    def start(self) -> ProcSampler:
        import threading

        self._cpu0 = self._cpu()
        self._t0 = time.perf_counter()
        self._peak = self.rss_mb()
        self._running = True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> CpuSample:
        self._running = False
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, self.rss_mb())
        return CpuSample(self._cpu() - self._cpu0, time.perf_counter() - self._t0, self._peak)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants as of now (``[pid]`` alone once it is gone)."""
    try:
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Bench:
    """One run of the suite: its scratch directory, its child processes, its scale."""

    work_dir: Path
    quick: bool = False
    children: list[Child] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        path = self.work_dir / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def scale(self, full: int, quick: int) -> int:
        """A size that is ``full`` in a real run and ``quick`` in the smoke test."""
        return quick if self.quick else full

    def adopt(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Stop every child started inside the block when it ends."""
        mark = len(self.children)
        try:
            yield
        finally:
            for child in reversed(self.children[mark:]):
                child.stop()
            del self.children[mark:]

    # --- the embedded parts -------------------------------------------------------------

    def broker(self) -> str:
        port = free_port()
        self.adopt(start_broker(port, self.log_dir))
        return f"127.0.0.1:{port}"

    def redis(self) -> str:
        port = free_port()
        self.adopt(start_redis(port, self.log_dir))
        return f"redis://127.0.0.1:{port}/0"

    def simulator(
        self, profiles: dict[str, dict[str, Any]] | None = None, latency_scale: float = 1.0
    ) -> str:
        """Start the provider SIMULATOR; ``profiles`` adds or overrides latency profiles."""
        port = free_port()
        env = base_env(
            SWITCHBOARD_SIMULATOR_PORT=str(port),
            SWITCHBOARD_SIMULATOR_LATENCY_SCALE=str(latency_scale),
        )
        if profiles:
            path = self.work_dir / f"profiles-{port}.yaml"
            path.write_text(yaml.safe_dump({"profiles": profiles}))
            env["SWITCHBOARD_SIMULATOR_PROFILES_FILE"] = str(path)
        child = self.adopt(python_service(f"simulator-{port}", ["simulator"], env, self.log_dir))
        url = f"http://127.0.0.1:{port}"
        wait_for("simulator", lambda: http_ok(f"{url}/health"), 60, child.alive)
        return url

    def service(self, name: str, args: Sequence[str], env: dict[str, str]) -> Child:
        """``switchboard <args>`` as a child process (router, worker, metrics)."""
        return self.adopt(python_service(name, args, env, self.log_dir))


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without any SWITCHBOARD_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    # the embedded broker has no idempotent producers (services/common/tansu.py)
    env.update(
        PYTHONUNBUFFERED="1",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        SWITCHBOARD_KAFKA_IDEMPOTENCE="false",
    )
    env.update(extra)
    return env


def unique_prefix(name: str) -> str:
    return f"bench-{name}-{uuid.uuid4().hex[:6]}"


def tier_spec(
    simulator_url: str,
    model: str,
    *,
    interactive: bool = True,
    concurrency: int = 64,
    timeout_s: float = 30,
) -> dict[str, Any]:
    """One tier whose one model is ``model`` on the simulator."""
    return {
        "description": f"Benchmark tier: simulated model {model}.",
        "interactive": interactive,
        "timeout_s": timeout_s,
        "request_timeout_s": max(timeout_s, 60),
        "concurrency": concurrency,
        "models": [
            {
                "model": f"openai/{model}",
                "name": model,
                "api_base": f"{simulator_url}/v1",
                "price_as": "gpt-4o-mini",
            }
        ],
    }


def write_config(
    path: Path,
    tiers: dict[str, dict[str, Any]],
    default: str,
    experiments: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """A routing config with these tiers, no rules, ``default`` as the default tier, and
    ``experiments`` if given."""
    spec: dict[str, Any] = {"version": 1, "tiers": tiers, "rules": [], "default": default}
    if experiments:
        spec["experiments"] = experiments
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def routing_config(
    path: Path,
    simulator_url: str,
    model: str,
    *,
    interactive: bool = True,
    concurrency: int = 64,
    timeout_s: float = 30,
) -> Path:
    """A one-tier routing config (tier ``bench``) whose one model is ``model`` on the simulator."""
    tier = tier_spec(
        simulator_url, model, interactive=interactive, concurrency=concurrency, timeout_s=timeout_s
    )
    return write_config(path, {"bench": tier}, "bench")


def python() -> str:
    return sys.executable


@dataclass
class Section:
    """One scenario's outcome: its key in latest.json, its data, and its part of the report."""

    key: str
    data: dict[str, Any]
    markdown: str


@dataclass
class RunningStack:
    """Our services as separate processes, as `switchboard up` runs them."""

    base_url: str
    api_key: str
    bootstrap: str
    redis_url: str
    prefix: str
    children: dict[str, Child]

    def pid(self, name: str) -> int:
        return self.children[name].pid


API_KEY = "sk-bench-" + uuid.uuid4().hex


def service_env(
    bootstrap: str, redis_url: str, prefix: str, config: Path, run_dir: Path, **extra: str
) -> dict[str, str]:
    settings = {
        "SWITCHBOARD_KAFKA_BOOTSTRAP": bootstrap,
        "SWITCHBOARD_REDIS_URL": redis_url,
        "SWITCHBOARD_TOPIC_PREFIX": prefix,
        "SWITCHBOARD_CONFIG": str(config),
        "SWITCHBOARD_RUN_DIR": str(run_dir),
        "SWITCHBOARD_LOG_LEVEL": "WARNING",
    }
    return base_env(**{**settings, **extra})  # ``extra`` may override any of them


def start_stack(
    bench: Bench,
    config: Path,
    *,
    bootstrap: str,
    redis_url: str,
    tiers: Sequence[str] = ("bench",),
    metrics: bool = True,
    metrics_port: int = 0,
    router: bool = True,
    worker_env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    extra_env: dict[str, str] | None = None,
    shadow: bool = False,
) -> RunningStack:
    """Start metrics, one worker per tier, the shadow worker (``shadow``) and the router; return
    once each says it is ready.

    The children are adopted by ``bench`` (stopped with its scope). Workers start together, so
    their consumer-group joins overlap.
    """
    prefix = unique_prefix(config.stem)
    run_dir = bench.work_dir / f"run-{prefix}"
    ready = run_dir / "ready"
    children: dict[str, Child] = {}

    def env(**extra: str) -> dict[str, str]:
        return service_env(
            bootstrap, redis_url, prefix, config, run_dir, **{**(extra_env or {}), **extra}
        )

    def wait(name: str, marker: str) -> None:
        child = children[name]
        wait_for(
            name,
            lambda: ready.exists() and any(p.name.startswith(marker) for p in ready.iterdir()),
            timeout_s,
            child.alive,
        )

    if metrics:
        children["metrics"] = bench.service(
            f"metrics-{prefix}",
            ["metrics"],
            env(
                SWITCHBOARD_DATA_DIR=str(bench.work_dir / f"data-{prefix}"),
                SWITCHBOARD_METRICS_PORT=str(metrics_port),
            ),
        )
    for tier in tiers:
        children[f"worker-{tier}"] = bench.service(
            f"worker-{tier}-{prefix}", ["worker", "--tier", tier], env(**(worker_env or {}))
        )
    if shadow:
        children["shadow"] = bench.service(f"shadow-{prefix}", ["shadow"], env())
    if metrics:
        wait("metrics", "metrics")
    for tier in tiers:
        wait(f"worker-{tier}", f"worker-{tier}-")
    if shadow:
        wait("shadow", "shadow")
    base_url = ""
    if router:
        port = free_port()
        children["router"] = bench.service(
            f"router-{prefix}",
            ["router"],
            env(
                SWITCHBOARD_PORT=str(port),
                SWITCHBOARD_API_KEY=API_KEY,
                # POST /v1/feedback asks the metrics service's query endpoint, if there is one
                **(
                    {"SWITCHBOARD_METRICS_URL": f"http://127.0.0.1:{metrics_port}"}
                    if metrics and metrics_port
                    else {}
                ),
            ),
        )
        wait("router", "router")
        base_url = f"http://127.0.0.1:{port}"
    return RunningStack(base_url, API_KEY, bootstrap, redis_url, prefix, children)


# --- Kafka helpers ----------------------------------------------------------------------------


async def produce_all(
    bootstrap: str, topic: str, payloads: Iterable[tuple[bytes | None, bytes]]
) -> int:
    """Send (key, value) pairs pipelined and wait until the broker has acknowledged them all."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20, acks=1
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in payloads]
        for fut in futures:
            await fut
    finally:
        await producer.stop()
    return len(futures)


class TopicCounter:
    """Reads a topic from its start and records when each distinct message key was first seen."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.first_seen: dict[bytes, float] = {}
        self.records = 0
        self._consumer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=8 << 20,
        )
        await self._consumer.start()

    async def poll(self) -> None:
        batches = await self._consumer.getmany(timeout_ms=100, max_records=50_000)
        now = time.perf_counter()
        for records in batches.values():
            for r in records:
                self.records += 1
                if r.key is not None and r.key not in self.first_seen:
                    self.first_seen[r.key] = now
                    self.first(r.key, r.value)

    def first(self, key: bytes, value: bytes) -> None:
        """A key's first record, read (a subclass keeps what it needs of it)."""

    async def wait_for(self, count: int, timeout_s: float) -> bool:
        """Poll until ``count`` distinct keys were seen; False on timeout."""
        deadline = time.perf_counter() + timeout_s
        while len(self.first_seen) < count:
            if time.perf_counter() > deadline:
                return False
            await self.poll()
        return True

    async def wait_for_keys(self, keys: set[bytes], timeout_s: float) -> bool:
        """Poll until every one of ``keys`` was seen; False on timeout."""
        deadline = time.perf_counter() + timeout_s
        while not keys <= self.first_seen.keys():
            if time.perf_counter() > deadline:
                return False
            await self.poll()
        return True

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
