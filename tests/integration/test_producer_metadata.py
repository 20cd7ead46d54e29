"""A producer's first send to a topic created after it started must not strand the records it
holds for its other topics (services/common/kafka.py ``track_every_topic``).

Without the fix, aiokafka's producer asks the broker about all topics until its first send to one
it has not seen; from then on it asks about that topic alone, and a record still lingering for any
other topic has no leader until it expires (40 s), then fails with NotLeaderForPartitionError.
A worker hit this on every router's first reply-topic rotation: one HTTP caller in a few thousand
waited past its client's timeout (docs/reliability.md).
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from services.common.kafka import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_a_new_topic_does_not_strand_records_for_the_others(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    old, new = f"{topic_prefix}.old", f"{topic_prefix}.new"
    await ensure_topics(kafka_bootstrap, [old], 4)
    # linger holds the record for ``old`` in the producer while it learns about ``new``
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=300)
    await producer.start()
    try:
        await producer.send_and_wait(old, b"known from the producer's first look at the broker")
        await ensure_topics(kafka_bootstrap, [new], 4)  # a topic it has not seen
        waiting = [await producer.send(old, b"lingering", key=str(i).encode()) for i in range(8)]
        await asyncio.wait_for(producer.send_and_wait(new, b"first record on the new topic"), 10)
        stored = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert {m.topic for m in stored} == {old}
        assert len({m.partition for m in stored}) > 1  # more than one partition was stranded
    finally:
        await producer.stop()
