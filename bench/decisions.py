"""Scenario 3, router decisions: Kafka ingress → tier topics through ONE router process.

Two figures:

* **decisions/s**: the ingress topic is filled with ``N`` varied requests before the router starts;
  the rate runs from the first commit of the router's ingress group to the last (the router
  commits a batch only once every routed message of it is stored), so process start-up and the
  consumer-group join are left out. Afterwards the tier and dead-letter topics are read back and
  must hold exactly ``N`` messages.
* **rule decision p50/p99**: ``classify`` timed per request in this process with
  ``perf_counter_ns`` over varied requests against the shipped ``config/simulated.yaml`` rules.

The other per-stage costs (parse, build, serialise) are timed the same way, so the report can say
where a decision's CPU goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import (
    API_KEY,
    ROOT,
    Bench,
    ProcSampler,
    Section,
    percentile,
    service_env,
    unique_prefix,
)
from schemas.topics import Topics
from schemas.v1 import ChatRequest
from services.common.routing_config import LoadedConfig, load_config
from services.router.domain.classify import classify
from services.router.service import Router
from switchboard.embedded import Child, free_port

CONFIG = ROOT / "config" / "simulated.yaml"
PARTITIONS = 4
# Neither the router nor the metrics writer talks to Redis; the setting must merely be present.
NO_REDIS = "redis://127.0.0.1:1/0"

_WORDS = (
    "the customer order invoice refund shipping delayed account password reset charge twice "
    "please summarise explain why how when where contract clause liability payment terms api "
    "error timeout latency deploy rollback database index query slow memory leak function test "
    "translate french german report quarterly revenue growth churn forecast model evaluate"
).split()
_TASKS = ("triage", "classify", "extract", "summarise", "chat", None, None)


_CORPUS = " ".join(random.Random(1).choice(_WORDS) for _ in range(20_000))


def _text(rng: random.Random, chars: int) -> str:
    """``chars`` characters of word salad from a random place in a fixed corpus."""
    start = rng.randrange(len(_CORPUS) - chars - 1)
    return _CORPUS[start : start + chars].strip()


def request_payload(rng: random.Random, index: int) -> dict[str, Any]:
    """One ingress request; the mix makes every rule of the simulated config fire."""
    kind = rng.random()
    meta: dict[str, Any] = {"tenant": f"tenant-{rng.randrange(50)}"}
    messages: list[dict[str, Any]] = []
    model = "switchboard/auto"
    if kind < 0.05:  # vision
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": _text(rng, rng.randrange(20, 300))},
                    {"type": "image_url", "image_url": {"url": f"https://img.example/{index}.png"}},
                ],
            }
        )
    elif kind < 0.15:  # reasoning, by flag or by task
        if rng.random() < 0.5:
            meta["requires_reasoning"] = True
        else:
            meta["task"] = "reasoning"
        messages.append({"role": "user", "content": _text(rng, rng.randrange(400, 4000))})
    elif kind < 0.40:  # triage-like tasks, some too long for the triage rule
        meta["task"] = rng.choice(_TASKS[:3])
        messages.append({"role": "user", "content": _text(rng, rng.randrange(80, 2500))})
    elif kind < 0.65:  # short chat
        messages.append({"role": "user", "content": _text(rng, rng.randrange(10, 110))})
    elif kind < 0.95:  # general multi-turn chat: the default tier
        meta["task"] = rng.choice(_TASKS[3:])
        messages.append({"role": "system", "content": _text(rng, rng.randrange(60, 400))})
        for turn in range(rng.randrange(1, 4)):
            messages.append({"role": "user", "content": _text(rng, rng.randrange(50, 800))})
            if turn:
                messages.append({"role": "assistant", "content": _text(rng, 200)})
    else:  # a tier named explicitly
        model = rng.choice(("fast", "balanced"))
        messages.append({"role": "user", "content": _text(rng, rng.randrange(20, 600))})
    if rng.random() < 0.3:
        meta["tags"] = {"team": rng.choice(("support", "legal", "eng")), "env": "prod"}
    body: dict[str, Any] = {
        "request_id": f"bench-{rng.getrandbits(128):032x}",
        "model": model,
        "messages": messages,
        "metadata": meta,
    }
    if rng.random() < 0.5:
        body["max_tokens"] = rng.choice((64, 256, 1024))
    return body


def request_payloads(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [json.dumps(request_payload(rng, i)).encode() for i in range(count)]


# --- in-process: what one decision costs --------------------------------------------------------


@dataclass
class StageTimes:
    """Per-request nanoseconds of each stage of the router's ingress path."""

    parse: list[int]
    classify: list[int]
    build: list[int]  # Router.route: classify, deadline, RoutedRequest
    encode: list[int]
    rules: dict[str, int]


def time_stages(payloads: Sequence[bytes], config: LoadedConfig) -> StageTimes:
    """Time parse, classify (the rule decision), build and encode for each payload, as the
    router's ingress does them (``IngressHandler._route``)."""
    clock = time.perf_counter_ns
    router = Router(config, Topics("bench"), publisher=None)  # type: ignore[arg-type]
    parsed = [ChatRequest.model_validate_json(p) for p in payloads[:2000]]  # warm-up
    for request in parsed:
        classify(request, config)
    times = StageTimes([], [], [], [], {})
    gc.collect()
    for payload in payloads:
        t0 = clock()
        request = ChatRequest.model_validate_json(payload)
        t1 = clock()
        decision = classify(request, config)
        t2 = clock()
        routed = router.route(request, "bench.results.v1")
        t3 = clock()
        router.encode(routed, payload)
        t4 = clock()
        times.parse.append(t1 - t0)
        times.classify.append(t2 - t1)
        times.build.append(t3 - t2)
        times.encode.append(t4 - t3)
        times.rules[decision.rule] = times.rules.get(decision.rule, 0) + 1
    return times


CANARY_CONFIG = ROOT / "config" / "examples" / "canary.yaml"
OVERHEAD_ROUNDS = 5


def experiment_overhead(
    payloads: Sequence[bytes], config: LoadedConfig, rounds: int = OVERHEAD_ROUNDS
) -> dict[str, float]:
    """The ingress path's CPU per request (parse + route + encode, summed p50s) on the shipped
    config and on the same config with a canary in its default tier (config/examples/canary.yaml),
    in alternating rounds; the median round of each."""
    off, on = config, load_config(CANARY_CONFIG)
    per: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for name, config in (("off", off), ("on", on)):
            t = time_stages(payloads, config)
            per[name].append(_us(t.parse, 50) + _us(t.build, 50) + _us(t.encode, 50))
    us_off = sorted(per["off"])[len(per["off"]) // 2]
    us_on = sorted(per["on"])[len(per["on"]) // 2]
    return {
        "ingress_us_off": round(us_off, 2),
        "ingress_us_canary": round(us_on, 2),
        "canary_extra_pct": round((us_on - us_off) / us_off * 100, 1),
        "rounds": rounds,
    }


def _us(values: list[int], q: float) -> float:
    return round(percentile(sorted(values), q) / 1000, 2)


# --- Kafka helpers shared with the ingest scenario ----------------------------------------------


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
    finally:
        await admin.close()


async def fill_topic(
    bootstrap: str, topic: str, payloads: Sequence[bytes], keys: Sequence[bytes | None]
) -> float:
    """Produce ``payloads`` with ``send_batch`` (pipelined, round-robin partitions); returns seconds."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        started = time.perf_counter()
        partitions = sorted(await producer.partitions_for(topic))
        futures: list[asyncio.Future[Any]] = []
        batch = producer.create_batch()
        part = 0
        for payload, key in zip(payloads, keys, strict=True):
            if batch.append(key=key, value=payload, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partitions[part]))
                part = (part + 1) % len(partitions)
                batch = producer.create_batch()
                batch.append(key=key, value=payload, timestamp=None)
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=partitions[part]))
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


@dataclass
class Window:
    """Progress of a service between its first and its last observed output."""

    first_count: int
    last_count: int
    seconds: float
    cpu_s: float
    rss_mb: float
    startup_s: float
    threads_cpu_s: dict[str, float]  # CPU seconds in the window by thread name (kernel's ``comm``)

    @property
    def rate(self) -> float:
        return (self.last_count - self.first_count) / self.seconds if self.seconds > 0 else 0.0


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid``, summed by thread name (Linux only)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def fetch_alone(bootstrap: str, topic: str, count: int) -> tuple[float, float]:
    """aiokafka ``getmany`` by itself over ``count`` records of ``topic``: (records/s, CPU µs each).

    The ceiling any consumer in one Python process starts from, measured on the same records.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        for tp in parts:
            await consumer.position(tp)  # resolve the start offsets before the clock starts
        seen = 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        while seen < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=20_000)
            seen += sum(len(r) for r in batches.values())
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        return seen / wall, cpu * 1e6 / seen
    finally:
        await consumer.stop()


async def watch(
    child: Child,
    progress: Callable[[], Any],
    target: int,
    *,
    stall_s: float = 60.0,
    poll_s: float = 0.05,
) -> Window:
    """Poll ``progress()`` (an awaitable count) until it reaches ``target``.

    The window opens at the first poll that sees progress (start-up and group join excluded) and
    closes when the target is reached; CPU and peak RSS of ``child`` are sampled over it.
    """
    spawned = time.perf_counter()
    sampler: ProcSampler | None = None
    threads0: dict[str, float] = {}
    first = count = 0
    t_first = 0.0
    last_change = time.perf_counter()
    while True:
        now_count = await progress()
        now = time.perf_counter()
        if now_count != count:
            last_change = now
        count = now_count
        if sampler is None and count > 0:
            sampler = ProcSampler([child.pid]).start()
            threads0 = thread_cpu(child.pid)
            first, t_first = count, now
        if count >= target:
            break
        if not child.alive():
            raise RuntimeError(f"{child.name} exited early:\n{child.tail()}")
        if now - last_change > stall_s:
            raise RuntimeError(f"{child.name}: no progress for {stall_s:.0f}s at {count}/{target}")
        await asyncio.sleep(poll_s)
    if sampler is None:  # everything arrived before the first poll
        sampler = ProcSampler([child.pid]).start()
        first, t_first = 0, spawned
    sample = sampler.stop()
    threads = thread_cpu(child.pid)
    return Window(
        first_count=first,
        last_count=count,
        seconds=time.perf_counter() - t_first,
        cpu_s=sample.cpu_s,
        rss_mb=sample.rss_mb_peak,
        startup_s=t_first - spawned,
        threads_cpu_s={k: v - threads0.get(k, 0.0) for k, v in threads.items()},
    )


async def committed_count(admin: AIOKafkaAdminClient, group: str, topic: str) -> int:
    """Records of ``topic`` that ``group`` has committed: what our services have fully handled.

    Used instead of the output topics' end offsets because Tansu reports a partition's end as the
    base offset of its last record batch + 1, which undercounts batched produce.
    """
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    offsets = await admin.list_consumer_group_offsets(group, partitions=parts)
    return sum(max(o.offset, 0) for o in offsets.values())


async def count_records(bootstrap: str, topics: Sequence[str]) -> dict[str, int]:
    """Records in each of ``topics``, read from the start (Tansu's end offsets undercount)."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    counts = dict.fromkeys(topics, 0)
    try:
        idle = 0
        while idle < 3:  # three empty fetches in a row: nothing more to read
            batches = await consumer.getmany(timeout_ms=300, max_records=20_000)
            idle = 0 if batches else idle + 1
            for tp, records in batches.items():
                counts[tp.topic] += len(records)
    finally:
        await consumer.stop()
    return counts


async def run_until_committed(
    bench: Bench,
    name: str,
    args: Sequence[str],
    env: dict[str, str],
    group: str,
    topic: str,
    total: int,
    poll_s: float = 0.05,
) -> Window:
    """Start ``switchboard <args>``, watch its group commit ``total`` records of ``topic``,
    stop it; the window is what ``watch`` saw."""
    admin = AIOKafkaAdminClient(bootstrap_servers=env["SWITCHBOARD_KAFKA_BOOTSTRAP"])
    await admin.start()
    try:
        child = bench.service(name, args, env)
        window = await watch(
            child, lambda: committed_count(admin, group, topic), total, poll_s=poll_s
        )
    finally:
        await admin.close()
    bench.stop(child)
    return window


def rules_only(directory: Path, path: Path = CONFIG) -> Path:
    """``path`` without its semantic stage, written into ``directory``: the rule decisions this
    scenario's targets are about (bench/semantic.py measures the stage; tests/unit/test_evaluate.py
    holds the eval's arithmetic to rule decisions)."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw.pop("semantic", None)
    for rule in raw.get("rules", []):
        rule.pop("after_semantic", None)
    out = directory / f"rules-only-{path.name}"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


async def route_all(
    bench: Bench, payloads: Sequence[bytes], config: LoadedConfig
) -> tuple[Window, dict[str, int], tuple[float, float]]:
    """Fill an ingress topic with ``payloads``, then time one router process routing them all,
    on ``config`` (its file); the tier and dead-letter topics must hold them all after."""
    bootstrap = bench.broker()
    prefix = unique_prefix("decisions")
    topics = Topics(prefix)
    tier_topics = [topics.tier(t) for t in config.tier_names]
    await create_topics(
        bootstrap,
        [topics.ingress, *tier_topics, topics.results, topics.dead_letter, topics.events],
        PARTITIONS,
    )
    await fill_topic(bootstrap, topics.ingress, payloads, [None] * len(payloads))
    fetch = await fetch_alone(bootstrap, topics.ingress, len(payloads))
    env = service_env(
        bootstrap,
        NO_REDIS,
        prefix,
        config.path,
        bench.work_dir / f"run-{prefix}",
        SWITCHBOARD_PORT=str(free_port()),
        SWITCHBOARD_API_KEY=API_KEY,
        SWITCHBOARD_PARTITIONS=str(PARTITIONS),
    )
    window = await run_until_committed(
        bench,
        f"router-{prefix}",
        ["router"],
        env,
        topics.router_group,
        topics.ingress,
        len(payloads),
    )
    return window, await count_records(bootstrap, [*tier_topics, topics.dead_letter]), fetch


def run(bench: Bench) -> Section:
    # Tansu's in-memory store slows down past ~100k requests of this size (with 150k the broker
    # kept the router waiting half the time, with 300k routing fell to a few hundred a second,
    # the broker at 80-90% CPU), so the run stays at a size where the router is the limit.
    messages = bench.scale(100_000, 2_000)
    config = load_config(rules_only(bench.work_dir))
    stages = time_stages(request_payloads(bench.scale(100_000, 5_000), seed=11), config)
    overhead = experiment_overhead(
        request_payloads(bench.scale(20_000, 2_000), seed=13),
        config,
        bench.scale(OVERHEAD_ROUNDS, 1),
    )
    payloads = request_payloads(messages)
    with bench.scope():
        window, outputs, (fetch_rate, fetch_us) = asyncio.run(route_all(bench, payloads, config))
    if sum(outputs.values()) != messages:
        raise RuntimeError(f"{messages} requests in, {sum(outputs.values())} out: {outputs}")
    counted = window.last_count - window.first_count
    data: dict[str, Any] = {
        "decisions_per_s": round(window.rate) if counted else None,
        "messages": messages,
        "window_messages": counted,
        "window_s": round(window.seconds, 2),
        "startup_s": round(window.startup_s, 2),
        "rule_p50_us": _us(stages.classify, 50),
        "rule_p99_us": _us(stages.classify, 99),
        "rule_p999_us": _us(stages.classify, 99.9),
        "stage_p50_us": {  # the ingress path; "route" is classify plus building the message
            "parse": _us(stages.parse, 50),
            "route": _us(stages.build, 50),
            "encode": _us(stages.encode, 50),
        },
        "rules_fired": stages.rules,
        "rss_mb": round(window.rss_mb, 1),
        "cpu_ms_per_decision": round(window.cpu_s * 1000 / counted, 4) if counted else None,
        "router_cores_busy": round(window.cpu_s / window.seconds, 2) if counted else None,
        "fetch_alone_per_s": round(fetch_rate),
        "fetch_alone_cpu_us": round(fetch_us, 1),
        "payload_bytes_mean": round(sum(map(len, payloads)) / len(payloads)),
        "experiments": overhead,
    }
    return Section(key="router", data=data, markdown=_markdown(data))


def _bound(cores_busy: float | None) -> str:
    """What the process's CPU use over the window says limits it."""
    if cores_busy is None:
        return "Too few messages to time."
    if cores_busy >= 0.85:
        return f"The router is CPU-bound: {cores_busy} cores busy over the window, one event loop."
    return (
        f"The router was busy {cores_busy} of a core over the window: it waited on the broker "
        "(fetch, produce acknowledgements, commits) for the rest."
    )


def _markdown(d: dict[str, Any]) -> str:
    if not d["window_messages"]:
        return (
            "### Router decisions\n\n"
            f"All {d['messages']:,} requests were committed by the first poll: too few to time "
            f"(rule decision p50 {d['rule_p50_us']} µs, p99 {d['rule_p99_us']} µs)."
        )
    stage = d["stage_p50_us"]
    in_process_us = sum(stage.values())
    cpu_us = (d["cpu_ms_per_decision"] or 0) * 1000
    rest_us = cpu_us - in_process_us - d["fetch_alone_cpu_us"]
    rules = ", ".join(f"{k} {v:,}" for k, v in sorted(d["rules_fired"].items()))
    lines = [
        "### Router decisions (Kafka ingress → tier topics, one router process)",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        f"| decisions/s | {d['decisions_per_s']:,} | ≥ 20,000 |",
        f"| rule decision p50 / p99 | {d['rule_p50_us']} µs / {d['rule_p99_us']} µs "
        "| p99 ≤ 100 µs |",
        f"| router CPU per decision | {cpu_us:.0f} µs ({d['router_cores_busy']} cores busy) | |",
        f"| router peak RSS | {d['rss_mb']} MB | |",
        f"| aiokafka `getmany` alone, same records | {d['fetch_alone_per_s']:,}/s, "
        f"{d['fetch_alone_cpu_us']} µs CPU each | |",
        "",
        f"{d['messages']:,} requests (mean {d['payload_bytes_mean']} B; rules fired on the "
        f"timed sample: {rules}) were in the ingress topic before the router started; the rate "
        f"counts the {d['window_messages']:,} committed between the first and the last commit "
        f"seen ({d['window_s']} s), leaving out start-up and the group join ({d['startup_s']} s). "
        f"{_bound(d['router_cores_busy'])} Of its {cpu_us:.0f} µs per decision, the "
        f"in-process stages take {in_process_us:.0f} µs at p50 (pydantic parse "
        f"{stage['parse']}, route {stage['route']} of which the rule decision "
        f"{d['rule_p50_us']}, encode {stage['encode']}), fetching ~{d['fetch_alone_cpu_us']} µs "
        f"(`getmany` alone), and producing, committing and the event loop the remaining "
        f"~{rest_us:.0f} µs; 20,000/s would need 50 µs.",
        "",
        _experiments_markdown(d["experiments"]),
    ]
    return "\n".join(lines)


def _experiments_markdown(e: dict[str, float]) -> str:
    return (
        f"With a canary in the default tier (config/examples/canary.yaml), the in-process "
        f"ingress path (parse + route + encode, p50s summed, median of {e['rounds']} "
        f"alternating rounds) costs {e['ingress_us_canary']} µs per request against "
        f"{e['ingress_us_off']} µs without: {e['canary_extra_pct']:+.1f} % (target < 5 %)."
    )
