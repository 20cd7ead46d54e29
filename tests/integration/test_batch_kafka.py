"""Batch consumption and batch publishing on the real broker: commit order, retries, partitions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from schemas.topics import Topics
from schemas.v1 import ChatRequest
from services.common.consumer import BatchConsumer
from services.common.kafka import KafkaBatchPublisher, Outgoing, ensure_topics
from services.common.runtime import start_http, stop_http
from services.router.app import create_app
from services.router.config import RouterSettings
from tests.integration.stack import produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """Records of ``topic`` the group has committed (sum over partitions)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        offsets = await admin.list_consumer_group_offsets(group, partitions=parts)
        return sum(max(o.offset, 0) for o in offsets.values())
    finally:
        await admin.close()


async def committed_is(bootstrap: str, group: str, topic: str, partitions: int, n: int) -> bool:
    return await committed(bootstrap, group, topic, partitions) == n


async def read_all(bootstrap: str, topic: str, count: int) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=20
    )
    await consumer.start()
    seen: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(60):
            while len(seen) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    seen.extend(records)
    finally:
        await consumer.stop()
    return seen


async def test_batches_are_committed_in_order_and_only_once_handled(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic, group = f"{topic_prefix}.in", f"{topic_prefix}-group"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    await produce(kafka_bootstrap, topic, *(str(i).encode() for i in range(3)))
    first_may_finish = asyncio.Event()
    later_done = asyncio.Event()
    handled: list[list[bytes]] = []
    failures = [ConnectionError("store down")]  # the second batch fails once, then succeeds

    async def handler(records: Sequence[ConsumerRecord]) -> None:
        values = [r.value for r in records]
        if values == [b"0"]:
            await first_may_finish.wait()
        elif failures:
            raise failures.pop()
        handled.append(values)
        if values != [b"0"]:
            later_done.set()

    consumer = BatchConsumer(
        bootstrap=kafka_bootstrap,
        topics=[topic],
        group_id=group,
        handler=handler,
        max_records=1,
        fetch_max_wait_ms=10,
        client_id="batch-test",
        max_in_flight=3,
    )
    await consumer.start()
    try:
        await asyncio.wait_for(later_done.wait(), 60)
        # A later batch is done, the first is not: nothing may be committed yet.
        assert await committed(kafka_bootstrap, group, topic, 1) == 0
        first_may_finish.set()
        await wait_until(lambda: committed_is(kafka_bootstrap, group, topic, 1, 3))
        assert sorted(handled) == [[b"0"], [b"1"], [b"2"]]  # the failed batch was retried once
    finally:
        await consumer.stop()


async def test_a_trickle_of_records_lingers_into_one_batch_and_stop_leaves_none_behind(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic, group = f"{topic_prefix}.trickle", f"{topic_prefix}-trickle"
    await ensure_topics(kafka_bootstrap, [topic], 2)
    handled: list[list[bytes]] = []

    async def handler(records: Sequence[ConsumerRecord]) -> None:
        handled.append(sorted(r.value for r in records))

    def lingering(max_records: int, linger_ms: int) -> BatchConsumer:
        return BatchConsumer(
            bootstrap=kafka_bootstrap,
            topics=[topic],
            group_id=group,
            handler=handler,
            max_records=max_records,
            fetch_max_wait_ms=10,
            client_id="linger-test",
            linger_ms=linger_ms,
        )

    # Five records produced one by one (many polls apart) make one batch, which ends as soon
    # as it is full rather than when the long linger runs out.
    consumer = lingering(5, 600_000)
    await consumer.start()
    try:
        await asyncio.wait_for(consumer.assigned.wait(), 60)
        for i in range(5):
            await produce(kafka_bootstrap, topic, str(i).encode())
        await wait_until(lambda: committed_is(kafka_bootstrap, group, topic, 2, 5))
    finally:
        await consumer.stop()
    assert handled == [[b"0", b"1", b"2", b"3", b"4"]]

    # Stopped while a record lingers: it is neither handled nor committed, so it comes again.
    consumer = lingering(100, 600_000)
    await consumer.start()
    try:
        await produce(kafka_bootstrap, topic, b"5")

        async def gathering() -> bool:
            return consumer._gathering

        await wait_until(gathering)
    finally:
        await consumer.stop()
    assert len(handled) == 1 and await committed(kafka_bootstrap, group, topic, 2) == 5
    consumer = lingering(100, 0)
    await consumer.start()
    try:
        await wait_until(lambda: committed_is(kafka_bootstrap, group, topic, 2, 6))
    finally:
        await consumer.stop()
    assert handled[1:] == [[b"5"]]


async def test_batch_publisher_puts_keys_where_the_default_partitioner_does(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}.out"
    await ensure_topics(kafka_bootstrap, [topic], 4)
    big = b"x" * (900 * 1024)  # several of these overflow one record batch
    messages = [Outgoing(topic, f"v{i}".encode(), f"key-{i}".encode()) for i in range(200)]
    messages += [Outgoing(topic, big) for _ in range(6)]
    publisher = KafkaBatchPublisher(kafka_bootstrap, "publisher-test")
    await publisher.start()
    try:
        await publisher.publish_all(messages)
    finally:
        await publisher.stop()
    records = await read_all(kafka_bootstrap, topic, len(messages))
    assert len(records) == len(messages)
    default = DefaultPartitioner()
    for record in records:
        if record.key is not None:
            assert record.partition == default(record.key, [0, 1, 2, 3], [0, 1, 2, 3])
    assert len({r.partition for r in records if r.key is None}) > 1  # keyless ones are spread


async def test_router_ingress_routes_a_batch_with_a_poison_message_then_commits(
    kafka_bootstrap: str, topic_prefix: str, routing_config: Path
) -> None:
    topics = Topics(topic_prefix)
    settings = RouterSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        config=routing_config,
        partitions=2,
        port=0,
        api_key="sk-test",
    )
    await ensure_topics(kafka_bootstrap, [topics.ingress], 2)
    good = [
        ChatRequest(
            request_id=f"b-{i}", model="fast", messages=[{"role": "user", "content": f"#{i}"}]
        ).model_dump_json()
        for i in range(40)
    ]
    payloads = [p.encode() for p in good[:20]] + [b"{poison"] + [p.encode() for p in good[20:]]
    await produce(kafka_bootstrap, topics.ingress, *payloads)
    server, task = await start_http(create_app(settings), "127.0.0.1", 0, lifespan=True)
    try:
        await wait_until(
            lambda: committed_is(kafka_bootstrap, topics.router_group, topics.ingress, 2, 41)
        )
        routed = await read_all(kafka_bootstrap, topics.tier("fast"), 40)
        letters = await read_all(kafka_bootstrap, topics.dead_letter, 1)
    finally:
        await stop_http(server, task)
    assert sorted(json.loads(r.value)["request"]["request_id"] for r in routed) == sorted(
        f"b-{i}" for i in range(40)
    )
    assert [json.loads(r.value)["payload"] for r in letters] == ["{poison"]
