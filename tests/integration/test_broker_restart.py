"""Publishing to a topic the broker lost while the publishers still had its metadata, as after a
restart of the embedded broker (it comes back empty). Tansu stores those publishes; the metadata
request that then re-creates the topic starts its partitions at offset 0 again, and the broker
fails the next produce requests with UnknownError until each partition has moved past them. The
publishers send those again. (Deleting the topic makes that state without the restart's races.)"""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from schemas.v1 import ChatRequest
from services.common.consumer import ConcurrentConsumer
from services.common.kafka import (
    BrokerPublisher,
    KafkaBatchPublisher,
    Outgoing,
    delete_topics,
    ensure_topics,
    make_broker,
    partition_for_key,
)
from tests.integration.stack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_publishers_get_past_the_partitions_a_lost_topic_starts_again(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    bootstrap = kafka_bootstrap
    topic = f"{topic_prefix}.lost"
    message = ChatRequest(messages=[{"role": "user", "content": "again"}])
    # a key for each publisher, on partitions of their own: both meet the refusals
    first = partition_for_key(b"a", 4)
    keys = ["a", next(k for k in "bcdefgh" if partition_for_key(k.encode(), 4) != first)]
    kafka = make_broker(bootstrap, "lost-topic-test")
    publisher = BrokerPublisher(kafka)
    batches = KafkaBatchPublisher(bootstrap, "lost-topic-test-batch")
    try:
        await ensure_topics(bootstrap, [topic], 4)
        await kafka.start()
        await batches.start()
        await publisher.publish(topic, message, key="a")  # both learn the topic's partitions
        await batches.publish_all([Outgoing(topic, b"{}", b"a")])
        await delete_topics(bootstrap, [topic])

        for _ in range(5):  # stored, with the metadata from before
            for key in keys:
                await publisher.publish(topic, message, key=key)
        other = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await other.start()
        try:
            assert len(await other.partitions_for(topic)) == 4  # this request re-creates it
            with pytest.raises(Exception, match="UnknownError"):  # the broker's refusal
                await other.send_and_wait(topic, b"{}", key=b"a")
        finally:
            await other.stop()

        for _ in range(4):
            await publisher.publish(topic, message, key=keys[0])
        await batches.publish_all([Outgoing(topic, b"{}", keys[1].encode()) for _ in range(5)])
    finally:
        await batches.stop()
        await kafka.stop()
        await delete_topics(bootstrap, [topic])


async def test_a_consumer_past_the_end_of_a_lost_partition_reads_the_new_one_from_the_start(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A group consumer at offset 6 of a partition the broker then lost: the new partition's
    first records (offsets 0..2) are handled, not skipped while the consumer waits at 6."""
    bootstrap = kafka_bootstrap
    topic = f"{topic_prefix}.rewind"
    handled: list[tuple[bytes, int]] = []

    async def handle(record: ConsumerRecord) -> None:
        handled.append((record.value, record.offset))

    async def count(n: int) -> bool:
        return len(handled) >= n

    await ensure_topics(bootstrap, [topic], 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    consumer = ConcurrentConsumer(
        bootstrap=bootstrap,
        topics=[topic],
        group_id=f"{topic}.group",
        handler=handle,
        concurrency=4,
        fetch_max_wait_ms=20,
        client_id="rewind-test",
    )
    await producer.start()
    try:
        await consumer.start()
        for i in range(6):
            await producer.send_and_wait(topic, f"old-{i}".encode(), partition=0)
        await wait_until(lambda: count(6), 60, "the old records handled")
        await delete_topics(bootstrap, [topic])
        await ensure_topics(bootstrap, [topic], 1)
        for i in range(3):
            await producer.send_and_wait(topic, f"new-{i}".encode(), partition=0)
        await wait_until(lambda: count(9), 60, "the new records handled")
        assert handled[6:] == [(b"new-0", 0), (b"new-1", 1), (b"new-2", 2)]
    finally:
        await consumer.stop()
        await producer.stop()
        await delete_topics(bootstrap, [topic])
