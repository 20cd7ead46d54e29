"""Scenario 5, poison messages: every topic a service consumes gets the same kinds of bad
message, then a good one behind them on the same partition.

Topics: the ingress (router), a tier topic (worker), the events topic (metrics) and the router's
reply topic. Kinds: invalid JSON, a schema version we do not speak, wrong field types, 9.9 MB, an
unknown tier (where a message names one), and numbers past their bounds (a 10^15 ms deadline,
2^63 tokens, an attempt past the UInt16 column) or a tool without its function. Passing means: each bad message is on the
dead-letter topic exactly once with a reason; each one that named a request id got a
``ChatError`` (ingress); the good message behind them was handled (answered, or committed by the
metrics writer); each group's committed offset reached the end of the partition; and an HTTP
request made afterwards is answered (the reply consumer still runs).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.common import Bench, RunningStack, routing_config, start_stack
from faults.common import Tally
from schemas.topics import Topics
from schemas.v1 import AUTO_MODEL
from services.common.kafka import MAX_MESSAGE_BYTES

MODEL = "faults-quick"
PROFILE = {"ttft_s": 0.02, "tokens_per_s": 2000.0, "output_tokens": 8, "jitter": 0.0}
# near the largest record Kafka takes (SWITCHBOARD_MAX_MESSAGE_BYTES), over the router's body limit
BIG = MAX_MESSAGE_BYTES - 64 * 1024
WAIT_S = 120.0


def _chat(request_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "model": AUTO_MODEL,
        "messages": [{"role": "user", "content": "poison test"}],
        **extra,
    }


def _routed(request_id: str, reply_to: str, **extra: Any) -> dict[str, Any]:
    return {
        "request": _chat(request_id, model="bench"),
        "tier": "bench",
        "rule": "forced",
        "config_hash": "faults",
        "routed_at": datetime.now(UTC).isoformat(),
        "reply_to": reply_to,
        **extra,
    }


def _event(event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "ts": datetime.now(UTC).isoformat(),
        "request_id": f"req-{event_id}",
        "tier": "bench",
        "model": MODEL,
        "provider": "openai",
        "rule": "forced",
        "config_hash": "faults",
        "attempt": 0,
        "status": "ok",
        "error_code": "",
        "tokens_in": 3,
        "tokens_out": 8,
        "latency_ms": 20.0,
        "ttft_ms": 20.0,
        "cost_usd": 0.0,
        "response_sha256": "",
        "tenant_hash": "",
        **extra,
    }


def _result(request_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "result",
        "request_id": request_id,
        "tier": "bench",
        "model": MODEL,
        "provider": "openai",
        "rule": "forced",
        "config_hash": "faults",
        "attempts": 1,
        "latency_ms": 1.0,
        "completion": {},
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        **extra,
    }


def _j(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


def poison_sets(topics: Topics, reply_topic: str) -> dict[str, list[tuple[str, bytes]]]:
    """Per topic, (kind, payload) of each bad message; the good one follows them."""
    junk = b"{" + b"x" * BIG  # 9.9 MB that is not JSON
    return {
        topics.ingress: [
            ("invalid JSON", b"{not json"),
            ("schema version 2", _j(_chat("poison-version", schema_version=2))),
            ("wrong types", _j({"request_id": "poison-types", "messages": "hello"})),
            ("9.9 MB", _j(_chat("poison-big", messages=[{"role": "user", "content": "x" * BIG}]))),
            ("unknown tier", _j(_chat("poison-tier", model="no-such-tier"))),
            ("deadline 10^15 ms", _j(_chat("poison-deadline", metadata={"deadline_ms": 10**15}))),
            ("max_tokens 2^63", _j(_chat("poison-max-tokens", max_tokens=2**63))),
            ("priority -1", _j(_chat("poison-priority", metadata={"priority": -1}))),
            ("tool without a function", _j(_chat("poison-tools", tools=[{"type": "function"}]))),
        ],
        topics.tier("bench"): [
            ("invalid JSON", b"{not json"),
            ("schema version 2", _j(_routed("t-version", topics.results, schema_version=2))),
            ("wrong types", _j(_routed("t-types", topics.results, attempt="first"))),
            ("9.9 MB", junk),
            ("unknown tier", _j(_routed("t-tier", topics.results, tier="no-such-tier"))),
            ("attempt 2^63", _j(_routed("t-attempt", topics.results, attempt=2**63))),
            (
                "deadline 10^15 ms",
                _j(
                    _routed(
                        "t-deadline",
                        topics.results,
                        request={
                            **_chat("t-deadline", model="bench"),
                            "metadata": {"deadline_ms": 10**15},
                        },
                    )
                ),
            ),
        ],
        topics.events: [
            ("invalid JSON", b"{not json"),
            ("schema version 2", _j(_event("e-version", schema_version=2))),
            ("wrong types", _j(_event("e-types", tokens_in="many"))),
            ("9.9 MB", junk),
            ("tokens 2^63", _j(_event("e-tokens", tokens_in=2**63))),
            ("attempt 2^16", _j(_event("e-attempt", attempt=2**16))),
            ("latency NaN", json.dumps(_event("e-nan", latency_ms=float("nan"))).encode()),
        ],
        reply_topic: [
            ("invalid JSON", b"{not json"),
            ("schema version 2", _j(_result("r-version", schema_version=2))),
            ("wrong types", _j(_result("r-types", attempts="one"))),
            ("9.9 MB", junk),
            ("attempts 2^63", _j(_result("r-attempts", attempts=2**63))),
        ],
    }


def good_messages(topics: Topics) -> dict[str, bytes]:
    return {
        topics.ingress: _j(_chat("good-ingress")),
        topics.tier("bench"): _j(_routed("good-tier", topics.results)),
        topics.events: _j(_event("good-event")),
    }


async def _reply_topic(bootstrap: str, topics: Topics) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(topics.reply_prefix)]
    finally:
        await admin.close()
    if len(names) != 1:
        raise RuntimeError(f"expected one router reply topic, found {names}")
    return names[0]


async def _produce(bootstrap: str, sends: Sequence[tuple[str, bytes]]) -> dict[str, int]:
    """Send each (topic, value) to partition 0, in order, one at a time; count per topic."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, max_request_size=MAX_MESSAGE_BYTES, acks="all"
    )
    await producer.start()
    counts: Counter[str] = Counter()
    try:
        for topic, value in sends:
            await producer.send_and_wait(topic, value, partition=0)
            counts[topic] += 1
    finally:
        await producer.stop()
    return dict(counts)


async def _read_until(
    bootstrap: str, topic: str, done: Any, timeout_s: float = WAIT_S
) -> list[dict[str, Any]]:
    """Every JSON record of ``topic`` from the start, until ``done(records)`` or the timeout."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
    )
    await consumer.start()
    seen: list[dict[str, Any]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done(seen) and loop.time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                seen.extend(json.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return seen


async def _committed(bootstrap: str, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(
            group, partitions=[TopicPartition(topic, 0)]
        )
    finally:
        await admin.close()
    return max((o.offset for o in offsets.values()), default=-1)


async def _wait_committed(bootstrap: str, group: str, topic: str, count: int) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        committed = await _committed(bootstrap, group, topic)
        if committed >= count or loop.time() > deadline:
            return committed
        await asyncio.sleep(0.2)


def _http_answer(stack: RunningStack) -> int:
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": AUTO_MODEL, "messages": [{"role": "user", "content": "still there?"}]},
        headers={"authorization": f"Bearer {stack.api_key}"},
        timeout=60,
    )
    return response.status_code


async def _scenario(stack: RunningStack) -> Tally:
    bootstrap, topics = stack.bootstrap, Topics(stack.prefix)
    reply_topic = await _reply_topic(bootstrap, topics)
    bad = poison_sets(topics, reply_topic)
    good = good_messages(topics)
    sends = [(topic, value) for topic, items in bad.items() for _, value in items]
    sends += list(good.items())
    produced = await _produce(bootstrap, sends)
    expected_letters = {topic: len(items) for topic, items in bad.items()}
    tally = Tally()
    problems: list[str] = []

    letters = await _read_until(
        bootstrap,
        topics.dead_letter,
        lambda seen: len(seen) >= sum(expected_letters.values()),
    )
    by_source = Counter(d["source_topic"] for d in letters)
    for topic, want in expected_letters.items():
        got = by_source.get(topic, 0)
        tally.lost += max(want - got, 0)
        tally.duplicated += max(got - want, 0)
        if got != want:
            problems.append(f"{topic}: {got} dead letters for {want} bad messages")
    unexplained = [d for d in letters if not d.get("reason")]
    tally.lost += len(unexplained)
    offsets = Counter((d["source_topic"], d["offset"]) for d in letters)
    tally.duplicated += sum(n - 1 for n in offsets.values() if n > 1)

    # ingress: a ChatError for each bad request with an id; results for both good requests
    answered_ids = {
        "poison-version",
        "poison-types",
        "poison-big",
        "poison-tier",
        "poison-deadline",
        "poison-max-tokens",
        "poison-priority",
        "poison-tools",
        "good-ingress",
        "good-tier",
    }
    results = await _read_until(
        bootstrap,
        topics.results,
        lambda seen: answered_ids <= {r.get("request_id") for r in seen},
    )
    per_id = Counter(r.get("request_id") for r in results)
    for request_id in sorted(answered_ids):
        if per_id[request_id] == 0:
            tally.lost += 1
            problems.append(f"no answer for {request_id}")
        tally.duplicated += max(per_id[request_id] - 1, 0)
    kinds = {r.get("request_id"): r.get("kind") for r in results}
    for request_id in ("good-ingress", "good-tier"):
        if kinds.get(request_id) not in (None, "result"):
            tally.lost += 1
            problems.append(f"{request_id} answered with an error: {kinds[request_id]}")

    # every consumer group got past the bad messages: committed the whole partition
    for group, topic in (
        (topics.router_group, topics.ingress),
        (topics.worker_group("bench"), topics.tier("bench")),
        (topics.metrics_group, topics.events),
    ):
        committed = await _wait_committed(bootstrap, group, topic, produced[topic])
        if committed < produced[topic]:
            tally.stuck += 1
            problems.append(f"{group} stopped at offset {committed} of {produced[topic]}")

    status = await asyncio.to_thread(_http_answer, stack)
    if status != 200:
        tally.stuck += 1
        problems.append(f"an HTTP request after the reply-topic poison got {status}")

    kinds_sent = sum(len(items) for items in bad.values())
    tally.detail = (
        f"{kinds_sent} bad messages on {len(bad)} topics → {len(letters)} dead letters, "
        f"{sum(per_id[i] for i in answered_ids)} answers for {len(answered_ids)} requests, "
        f"HTTP after: {status}" + (f"; {'; '.join(problems)}" if problems else "")
    )
    return tally


def run(bench: Bench) -> Tally:
    sim_url = bench.simulator(profiles={MODEL: PROFILE})
    bootstrap = bench.broker()
    redis_url = bench.redis()
    config = routing_config(bench.work_dir / "poison.yaml", sim_url, MODEL)
    stack = start_stack(bench, config, bootstrap=bootstrap, redis_url=redis_url)
    return asyncio.run(_scenario(stack))
