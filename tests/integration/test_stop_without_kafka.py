"""A consumer stops, and its process can exit, while Kafka is unreachable: aiokafka retries a
commit to a broker it cannot reach with no end, and its fetcher's stop raises CancelledError when
a fetch was waiting to retry. A broker of its own (the test kills it)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.common import consumer as consumers
from services.common.consumer import BatchConsumer, ConcurrentConsumer
from services.common.kafka import ensure_topics
from switchboard.embedded import Child

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
BOUND_S = 2.0


async def test_consumers_stop_in_bounded_time_when_the_broker_is_gone(
    own_broker: tuple[Child, str],
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(consumers, "LAST_COMMIT_S", BOUND_S)
    child, bootstrap = own_broker
    one, batch = f"{topic_prefix}.one", f"{topic_prefix}.batch"
    await ensure_topics(bootstrap, [one, batch], 1)
    release = asyncio.Event()  # handlers finish only once the broker is gone
    handling = {one: asyncio.Event(), batch: asyncio.Event()}

    async def handle(record: ConsumerRecord) -> None:
        handling[one].set()
        await release.wait()

    async def handle_batch(records: Sequence[ConsumerRecord]) -> None:
        handling[batch].set()
        await release.wait()

    common: dict[str, Any] = {
        "fetch_max_wait_ms": 20,
        "drain_timeout_s": BOUND_S,
        "bootstrap": bootstrap,
    }
    parts: list[ConcurrentConsumer | BatchConsumer] = [
        ConcurrentConsumer(
            topics=[one],
            group_id=f"{one}.g",
            handler=handle,
            concurrency=2,
            client_id="one",
            **common,
        ),
        BatchConsumer(
            topics=[batch],
            group_id=f"{batch}.g",
            handler=handle_batch,
            max_records=10,
            client_id="batch",
            **common,
        ),
    ]
    for part in parts:
        await part.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(one, b"x")
        await producer.send_and_wait(batch, b"y")
    finally:
        await producer.stop()
    async with asyncio.timeout(60):
        await asyncio.gather(*(h.wait() for h in handling.values()))

    child.stop()
    release.set()  # handled, with the broker gone: the last commits cannot go through
    loop = asyncio.get_running_loop()
    for part in parts:
        began = loop.time()
        await asyncio.wait_for(part.stop(), 30)  # before the fix: waited for ever
        assert loop.time() - began < 15
    assert "the last commit did not finish" in caplog.text
