"""Scenario 7: what Redis holds per request, to size it (README "Sizing Redis").

Sends requests with an ``Idempotency-Key`` through the real stack, for a short and a long answer
(the provider SIMULATOR's ``output_tokens``), then asks Redis what the keys of each kind take
(``MEMORY USAGE``, every key) and how much ``used_memory`` grew. A final outcome is kept for
``SWITCHBOARD_OUTCOME_TTL_S``, the delivery notes as long; so Redis needs about
bytes per request x requests per second x TTL.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from typing import Any

import httpx
import redis

from bench.common import Bench, Section, routing_config, start_stack

ANSWERS = {"short": 40, "long": 800}  # output tokens per answer
CONCURRENCY = 32


async def _send(base_url: str, api_key: str, count: int) -> int:
    """``count`` requests with keys, ``CONCURRENCY`` at a time; how many were answered."""
    answered = 0
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal answered
        async with slots:
            response = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "bench",
                    "messages": [{"role": "user", "content": f"Route ticket {i}: refund request"}],
                    "metadata": {"tenant": "sizing"},
                },
                headers={"idempotency-key": f"size-{uuid.uuid4().hex}"},
            )
            answered += response.status_code == 200

    headers = {"authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        await asyncio.gather(*(one(http, i) for i in range(count)))
    return answered


def _by_kind(client: redis.Redis, prefix: str) -> dict[str, dict[str, float]]:
    """Per key kind (``<prefix>:<kind>:…``): how many keys, and their mean MEMORY USAGE."""
    sizes: dict[str, list[int]] = {}
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = key.decode().split(":")[1]
        sizes.setdefault(kind, []).append(int(client.memory_usage(key) or 0))
    return {
        kind: {"keys": len(values), "mean_bytes": round(statistics.fmean(values), 1)}
        for kind, values in sorted(sizes.items())
    }


def _measure(bench: Bench, label: str, tokens: int, count: int) -> dict[str, Any]:
    model = f"sizing-{label}"
    profile = {"ttft_s": 0.01, "tokens_per_s": 50_000.0, "output_tokens": tokens, "jitter": 0.0}
    sim_url = bench.simulator(profiles={model: profile})
    redis_url = bench.redis()
    config = routing_config(bench.work_dir / f"sizing-{label}.yaml", sim_url, model)
    client = redis.Redis.from_url(redis_url)
    used_before = int(client.info("memory")["used_memory"])
    stack = start_stack(bench, config, bootstrap=bench.broker(), redis_url=redis_url, metrics=False)
    answered = asyncio.run(_send(stack.base_url, stack.api_key, count))
    kinds = _by_kind(client, stack.prefix)
    used_after = int(client.info("memory")["used_memory"])
    client.close()
    per_request = {
        kind: round(v["mean_bytes"] * v["keys"] / max(answered, 1), 1)
        for kind, v in kinds.items()
        if kind != "alive"  # worker leases: a few keys however many requests
    }
    return {
        "output_tokens": tokens,
        "requests": count,
        "answered": answered,
        "keys": kinds,
        "bytes_per_request": per_request,
        "bytes_per_request_total": round(sum(per_request.values()), 1),
        "used_memory_growth_per_request": round((used_after - used_before) / max(answered, 1), 1),
    }


def run(bench: Bench) -> Section:
    count = bench.scale(2000, 40)
    data: dict[str, Any] = {}
    sizes = list(ANSWERS.items())[:1] if bench.quick else list(ANSWERS.items())
    for label, tokens in sizes:
        with bench.scope():  # each size on a fresh broker, Redis and stack
            data[label] = _measure(bench, label, tokens, count)
    rows = [
        "| answer | requests answered | outcome | fingerprint | delivery note | "
        "total per request | used_memory growth per request |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, d in data.items():
        b = d["bytes_per_request"]
        rows.append(
            f"| {label} ({d['output_tokens']} tokens) | {d['answered']}/{d['requests']} | "
            f"{b.get('outcome', 0):,.0f} B | {b.get('fingerprint', 0):,.0f} B | "
            f"{b.get('sent', 0):,.0f} B | {d['bytes_per_request_total']:,.0f} B | "
            f"{d['used_memory_growth_per_request']:,.0f} B |"
        )
    markdown = (
        "Requests with an Idempotency-Key through router and worker; `MEMORY USAGE` of every "
        "key, by kind, divided by the requests answered.\n\n" + "\n".join(rows) + "\n"
    )
    return Section("redis", data, markdown)
