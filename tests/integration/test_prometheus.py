"""``GET /metrics`` of the router, a worker and the metrics service, scraped after real traffic
through the stack (real broker, Redis, chDB, provider simulator): each series moves by what was
sent, the lag of each consumed partition drops to 0, a poison message counts a dead letter.

The services share this process, and so one registry (``prometheus_client.REGISTRY``) that
earlier tests may have counted into: every figure is compared as the change since a scrape
taken before the traffic.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from schemas.v1 import ChatRequest
from services.common.consumer import BatchConsumer, ConcurrentConsumer
from services.common.kafka import ensure_topics
from switchboard.embedded import free_port
from tests.integration.stack import (
    API_KEY,
    START_S,
    STOP_S,
    Infra,
    Stack,
    collect,
    produce,
    wait_until,
    within,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# "fast" answers from the simulator; "broken" has two models on a port nothing listens on, so
# each is tried twice (a retry), the second after the first failed (a fallback), then it errs.
CONFIG = """
tiers:
  fast:
    interactive: true
    timeout_s: 10
    retries_per_model: 0
    models:
      - {{model: openai/sim-light, name: sim-light, api_base: "{sim}/v1", price_as: gpt-4o-mini}}
  broken:
    interactive: true
    timeout_s: 5
    retries_per_model: 1
    retry_backoff_s: 0.01
    models:
      - {{model: openai/dead-a, name: dead-a, api_base: "http://127.0.0.1:{dead}/v1"}}
      - {{model: openai/dead-b, name: dead-b, api_base: "http://127.0.0.1:{dead}/v1"}}
default: fast
"""
SYNC, INGRESS = 5, 3
WAIT_S = 60.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Running:
    stack: Stack
    router: str
    worker: str
    metrics: str


@pytest.fixture
async def running(infra: Infra) -> AsyncIterator[Running]:
    path = infra.config(CONFIG.format(sim=infra.simulator_url, dead=free_port()))
    port = free_port()
    async with infra.stack(path, ["fast", "broken"], metrics_port=port, worker_http=True) as stack:
        worker = f"http://127.0.0.1:{stack.workers['fast'].http_port}"
        yield Running(stack, stack.base_url, worker, f"http://127.0.0.1:{port}")


async def scrape(base_url: str) -> Samples:
    """Every sample ``base_url``'s ``/metrics`` exposes, by name and labels."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{base_url}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return parsed(response.text)


def parsed(exposition: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def lags(samples: Samples, group: str, topic: str) -> dict[str, float]:
    """Partition → lag of ``group`` on ``topic``."""
    out = {}
    for (name, labels), v in samples.items():
        found = dict(labels)
        if name == "switchboard_kafka_consumer_lag" and (found["group"], found["topic"]) == (
            group,
            topic,
        ):
            out[found["partition"]] = v
    return out


async def test_traffic_moves_the_series_of_router_worker_and_metrics_service(
    running: Running,
) -> None:
    stack, topics = running.stack, running.stack.topics
    before = await scrape(running.router)
    worker_before = await scrape(running.worker)
    metrics_before = await scrape(running.metrics)
    headers = {"authorization": f"Bearer {API_KEY}"}
    ask = {"messages": [{"role": "user", "content": "Classify this ticket"}]}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=30) as http:
        for _ in range(SYNC):
            resp = await http.post("/v1/chat/completions", json={**ask, "model": "fast"})
            assert resp.status_code == 200, resp.text
        async with http.stream(
            "POST", "/v1/chat/completions", json={**ask, "model": "fast", "stream": True}
        ) as streamed:
            assert streamed.status_code == 200
            assert "[DONE]" in "".join([chunk async for chunk in streamed.aiter_text()])
        unknown = await http.post("/v1/chat/completions", json={**ask, "model": "no-such"})
        assert unknown.status_code == 400, unknown.text
        keyless = await http.post(
            "/v1/chat/completions", json={**ask, "model": "fast"}, headers={"authorization": ""}
        )
        assert keyless.status_code == 401, keyless.text
        failed = await http.post("/v1/chat/completions", json={**ask, "model": "broken"})
        assert failed.status_code == 502, failed.text
    jobs = [
        ChatRequest.model_validate({**ask, "request_id": f"prom-{i}", "model": "fast"})
        .model_dump_json()
        .encode()
        for i in range(INGRESS)
    ]
    await produce(stack.bootstrap, topics.ingress, *jobs, b"{poison for the router")
    await produce(stack.bootstrap, topics.tier("fast"), b"{poison for the worker")
    await collect(stack.bootstrap, topics.results, lambda seen: len(seen) >= INGRESS)

    answered = SYNC + 1  # the stream too
    router_series = {
        ("switchboard_router_requests_total", "fast", "ok"): answered,
        ("switchboard_router_requests_total", "fast", "routed"): INGRESS,
        ("switchboard_router_requests_total", "", "rejected"): 3,  # 400, 401, the poison
        ("switchboard_router_requests_total", "broken", "error"): 1,
        ("switchboard_router_request_duration_seconds_count", "fast", "ok"): answered,
        ("switchboard_router_request_duration_seconds_count", "", "rejected"): 2,
    }

    async def router_counted() -> Samples | None:
        after = await scrape(running.router)
        for (name, tier, status), n in router_series.items():
            if moved(after, before, name, tier=tier, status=status) != n:
                return None
        return after

    after = await wait_until(router_counted, WAIT_S, "the router's counts")
    # decided: the answered, the failed and the routed; not the unknown model's nor the poison
    decided = moved(after, before, "switchboard_router_decision_duration_seconds_count")
    assert decided == answered + 1 + INGRESS
    assert moved(after, before, "switchboard_dead_letters_total", service="router", topic=topics.ingress) == 1  # fmt: skip

    async def worker_counted() -> Samples | None:
        got = await scrape(running.worker)
        done = moved(got, worker_before, "switchboard_worker_requests_total", tier="fast", status="ok")  # fmt: skip
        rejected = moved(got, worker_before, "switchboard_worker_requests_total", tier="fast", status="rejected")  # fmt: skip
        return got if (done, rejected) == (answered + INGRESS, 1) else None

    worker = await wait_until(worker_counted, WAIT_S, "the worker's counts")
    fast = {"tier": "fast", "model": "sim-light"}
    calls = moved(worker, worker_before, "switchboard_model_call_duration_seconds_count", **fast, status="ok")  # fmt: skip
    assert calls == answered + INGRESS
    assert moved(worker, worker_before, "switchboard_model_ttft_seconds_count", **fast) > 0
    assert moved(worker, worker_before, "switchboard_tokens_total", **fast, direction="in") > 0
    assert moved(worker, worker_before, "switchboard_tokens_total", **fast, direction="out") > 0
    assert moved(worker, worker_before, "switchboard_cost_usd_total", **fast) > 0
    assert value(worker, "switchboard_worker_in_flight", tier="fast") == 0
    assert moved(worker, worker_before, "switchboard_dead_letters_total", service="worker", topic=topics.tier("fast")) == 1  # fmt: skip
    # broken: dead-a, its retry, dead-b (a fallback within the tier), its retry; all errors
    for model in ("dead-a", "dead-b"):
        labels = {"tier": "broken", "model": model}
        assert moved(worker, worker_before, "switchboard_model_call_duration_seconds_count", **labels, status="error") == 2  # fmt: skip
        assert moved(worker, worker_before, "switchboard_retries_total", **labels) == 1
    assert moved(worker, worker_before, "switchboard_fallbacks_total", tier="broken") == 1
    assert moved(worker, worker_before, "switchboard_worker_requests_total", tier="broken", status="error") == 1  # fmt: skip

    # every attempt's event reaches ClickHouse: the answers and the broken tier's four
    events = answered + INGRESS + 4

    async def written() -> Samples | None:
        got = await scrape(running.metrics)
        n = moved(got, metrics_before, "switchboard_events_written_total")
        return got if n >= events else None

    metrics = await wait_until(written, WAIT_S, "the events written")
    assert moved(metrics, metrics_before, "switchboard_clickhouse_insert_duration_seconds_count") > 0  # fmt: skip
    assert moved(metrics, metrics_before, "switchboard_clickhouse_errors_total", operation="insert") == 0  # fmt: skip


async def test_lag_is_reported_per_partition_and_drops_to_zero_once_consumed(
    running: Running,
) -> None:
    stack, topics = running.stack, running.stack.topics
    ask = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    jobs = [
        ChatRequest.model_validate({**ask, "request_id": f"lag-{i}"}).model_dump_json().encode()
        for i in range(6)
    ]
    await produce(stack.bootstrap, topics.ingress, *jobs)
    await collect(stack.bootstrap, topics.results, lambda seen: len(seen) >= len(jobs))
    watched = [
        (running.router, topics.router_group, topics.ingress),
        (running.worker, topics.worker_group("fast"), topics.tier("fast")),
        (running.metrics, topics.metrics_group, topics.events),
    ]
    for url, group, topic in watched:

        async def caught_up(url: str = url, group: str = group, topic: str = topic) -> bool:
            found = lags(await scrape(url), group, topic)
            # both partitions of the topic (the stack makes two), each a count, each done
            assert all(v >= 0 and not math.isnan(v) for v in found.values()), found
            return set(found) == {"0", "1"} and all(v == 0 for v in found.values())

        await wait_until(caught_up, WAIT_S, f"{group}'s lag on {topic} to reach 0")


@pytest.mark.parametrize("kind", ["batch", "concurrent"])
async def test_lag_counts_records_fetched_and_not_yet_committed(
    kafka_bootstrap: str, topic_prefix: str, kind: str
) -> None:
    """While the handler holds five records the lag is 5 (not 0: they are fetched, not done);
    once they are done and committed it is 0."""
    topic, group = f"{topic_prefix}.lag", f"{topic_prefix}-lag"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    release = asyncio.Event()

    async def hold(_: object) -> None:
        await asyncio.wait_for(release.wait(), WAIT_S)

    common = {
        "bootstrap": kafka_bootstrap,
        "topics": [topic],
        "group_id": group,
        "fetch_max_wait_ms": 20,
        "client_id": f"lag-{kind}",
    }
    consumer: BatchConsumer | ConcurrentConsumer = (
        BatchConsumer(**common, handler=hold, max_records=100)
        if kind == "batch"
        else ConcurrentConsumer(**common, handler=hold, concurrency=10)
    )
    await within(START_S, "the consumer to start", consumer.start())
    try:
        await within(START_S, "the assignment", consumer.assigned.wait())
        await produce(kafka_bootstrap, topic, *(b"%d" % i for i in range(5)))

        def lag_is(n: float) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                samples = parsed(generate_latest().decode())
                return lags(samples, group, topic) == {"0": n}

            return check

        await wait_until(lag_is(5), WAIT_S, "a lag of 5 while the records are held")
        release.set()
        await wait_until(lag_is(0), WAIT_S, "a lag of 0 once they are committed")
    finally:
        release.set()
        await within(STOP_S, "the consumer to stop", consumer.stop())
    assert lags(parsed(generate_latest().decode()), group, topic) == {}  # stopped: not watched
