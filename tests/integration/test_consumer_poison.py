"""Consumers on the real broker: a record no handler can take is dead-lettered, the partition
moves on; transient failures are retried; a dead fetch loop stops the process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from aiokafka import ConsumerRecord

from services.common import retry
from services.common.consumer import BatchConsumer, ConcurrentConsumer
from services.common.kafka import ensure_topics
from tests.integration.stack import produce, wait_until
from tests.integration.test_batch_kafka import committed_is

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Poison(ValueError):
    """What the handler raises for the record at fault: nothing transient about it."""


async def test_a_batch_with_a_poison_record_is_split_and_the_rest_handled(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic, group = f"{topic_prefix}.in", f"{topic_prefix}-group"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    await produce(kafka_bootstrap, topic, *(str(i).encode() for i in range(8)))
    handled: list[bytes] = []
    poisoned: list[tuple[int, str]] = []
    transient = [ConnectionError("store down")]  # one transient failure: retried, not poison

    async def handler(records: Sequence[ConsumerRecord]) -> None:
        if transient:
            raise transient.pop()
        if any(r.value == b"5" for r in records):
            raise Poison("deadline_ms out of range")
        handled.extend(r.value for r in records)

    async def on_poison(record: ConsumerRecord, exc: Exception) -> None:
        poisoned.append((record.offset, type(exc).__name__))

    consumer = BatchConsumer(
        bootstrap=kafka_bootstrap,
        topics=[topic],
        group_id=group,
        handler=handler,
        max_records=8,
        fetch_max_wait_ms=20,
        client_id="poison-batch",
        linger_ms=300,  # the eight records arrive as one batch
        on_poison=on_poison,
    )
    await consumer.start()
    try:
        await wait_until(lambda: committed_is(kafka_bootstrap, group, topic, 1, 8), 60)
    finally:
        await consumer.stop()
    assert poisoned == [(5, "Poison")]
    assert sorted(handled) == [str(i).encode() for i in range(8) if i != 5]
    assert consumer.poisoned == 1


async def test_a_poison_record_does_not_hold_the_records_behind_it(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic, group = f"{topic_prefix}.in", f"{topic_prefix}-group"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    await produce(kafka_bootstrap, topic, b"poison", b"next")
    handled: list[bytes] = []
    poisoned: list[bytes] = []
    calls = {"poison": 0}

    async def handler(record: ConsumerRecord) -> None:
        if record.value == b"poison":
            calls["poison"] += 1
            raise OverflowError("date value out of range")
        handled.append(record.value)

    async def on_poison(record: ConsumerRecord, exc: Exception) -> None:
        poisoned.append(record.value)

    consumer = ConcurrentConsumer(
        bootstrap=kafka_bootstrap,
        topics=[topic],
        group_id=group,
        handler=handler,
        concurrency=4,
        fetch_max_wait_ms=20,
        client_id="poison-concurrent",
        on_poison=on_poison,
    )
    await consumer.start()
    try:
        await wait_until(lambda: committed_is(kafka_bootstrap, group, topic, 1, 2), 60)
    finally:
        await consumer.stop()
    assert handled == [b"next"] and poisoned == [b"poison"]
    assert calls["poison"] == 1  # called once, never retried


async def test_a_fetch_loop_that_dies_stops_the_process(
    kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"{topic_prefix}.in"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    stopped: list[str] = []
    stop = asyncio.Event()

    def stop_process(reason: str) -> None:
        stopped.append(reason)
        stop.set()

    monkeypatch.setattr(retry, "stop_process", stop_process)

    async def handler(record: ConsumerRecord) -> None:
        pass

    consumer = ConcurrentConsumer(
        bootstrap=kafka_bootstrap,
        topics=[topic],
        group_id=f"{topic_prefix}-group",
        handler=handler,
        concurrency=1,
        fetch_max_wait_ms=20,
        client_id="dies",
    )

    async def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("fetcher bug")

    await consumer.start()
    try:
        monkeypatch.setattr(consumer._consumer, "getmany", broken)
        await asyncio.wait_for(stop.wait(), 10)
    finally:
        await consumer.stop()
    assert "the Kafka fetch loop stopped: RuntimeError: fetcher bug" in stopped[0]
