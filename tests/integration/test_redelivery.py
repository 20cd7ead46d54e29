"""A tier-topic record handled again after a crash: answered once, whatever the crash cut short.

The worker's handler gets the same record twice, as the partition's next owner does when the
first one died before committing. Real broker, Redis and provider simulator.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from schemas.v1 import ChatRequest, ChatResult, Usage
from services.common.kafka import log_ends, partition_for_key
from services.workers.adapters.sent import DELIVERY_HEADER
from tests.integration.stack import Stack, collect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def routed_record(stack: Stack, request_id: str, offset: int) -> ConsumerRecord:
    job = ChatRequest(
        request_id=request_id, model="fast", messages=[{"role": "user", "content": "once"}]
    )
    routed = stack.router_app.state.ctx.router.route(job, stack.topics.results)
    value = routed.model_dump_json().encode()
    return ConsumerRecord(
        stack.topics.tier("fast"), 0, offset, 0, 0, None, value, None, 0, len(value), ()
    )


def stored_result(request_id: str) -> ChatResult:
    return ChatResult(
        request_id=request_id,
        tier="fast",
        model="sim-light",
        provider="openai",
        rule="forced",
        config_hash="x",
        attempts=1,
        latency_ms=1.0,
        completion={"choices": []},
        usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
    )


async def answers(stack: Stack, request_id: str) -> list[dict[str, object]]:
    """Every answer to ``request_id`` on the results topic: once the first is readable, all of
    them up to the topic's end."""
    await collect(
        stack.bootstrap,
        stack.topics.results,
        lambda ms: any(m["request_id"] == request_id for m in ms),
    )
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(stack.topics.results) or set()
        tps = [TopicPartition(stack.topics.results, p) for p in sorted(partitions)]
        ends = await log_ends(consumer, tps)
        await consumer.seek_to_beginning(*tps)
        found: list[dict[str, object]] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                messages = [json.loads(r.value) for r in records]
                found += [m for m in messages if m["request_id"] == request_id]
        return found
    finally:
        await consumer.stop()


async def test_a_record_redelivered_after_its_answer_went_out_is_not_answered_again(
    fast_stack: Stack,
) -> None:
    stack = fast_stack
    worker = stack.workers["fast"]
    record = routed_record(stack, f"redeliver-{uuid.uuid4().hex}", offset=424_242)
    request_id = json.loads(record.value)["request"]["request_id"]

    await worker.handler(record)  # answered; then "the worker dies before committing"
    await worker.handler(record)  # the next owner gets the same record

    assert len(await answers(stack, request_id)) == 1
    assert worker.service.already_sent == 1
    assert worker.service.replayed == 0  # not even the stored answer was sent again
    assert worker.sent.searches == 1


async def test_a_record_whose_answer_was_noted_but_never_sent_is_answered(
    fast_stack: Stack,
) -> None:
    stack = fast_stack
    worker = stack.workers["fast"]
    record = routed_record(stack, f"cut-{uuid.uuid4().hex}", offset=7)
    request_id = json.loads(record.value)["request"]["request_id"]
    delivery = f"{record.topic}:{record.partition}:{record.offset}"
    stored = stored_result(request_id)
    # what a worker killed between storing its answer and publishing it leaves behind
    await worker.outcomes.put(
        request_id, stored.model_dump_json().encode(), delivery, stack.topics.results
    )

    await worker.handler(record)

    sent = await answers(stack, request_id)
    assert len(sent) == 1 and sent[0]["model"] == "sim-light"
    assert worker.service.already_sent == 0
    assert worker.service.replayed == 1  # from the store: no model call
    assert worker.sent.searches == 2  # not found, and not found again once the note settled


async def test_two_owners_handling_one_record_at_once_send_one_answer(fast_stack: Stack) -> None:
    """A worker the group gave up on (it missed its heartbeats) still works on a record while
    the partition's new owner starts on it: both call the model, one answer goes out."""
    stack = fast_stack
    worker = stack.workers["fast"]
    record = routed_record(stack, f"zombie-{uuid.uuid4().hex}", offset=99)
    request_id = json.loads(record.value)["request"]["request_id"]

    await asyncio.gather(worker.handler(record), worker.handler(record))

    assert len(await answers(stack, request_id)) == 1
    assert worker.service.already_sent == 1


async def test_an_answer_inside_the_partitions_last_record_batch_is_found(
    fast_stack: Stack,
) -> None:
    """A busy worker's producer sends answers in record batches of several; the search reads to
    the partition's true end, also when the answer sits inside its last batch (Tansu reports
    the end of a partition as its last batch's first offset + 1)."""
    stack = fast_stack
    topic = stack.topics.results
    request_id = f"batched-{uuid.uuid4().hex}"
    delivery = f"{stack.topics.tier('fast')}:0:31337"
    since_ms = int(time.time() * 1000)
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=200)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partition = partitions[partition_for_key(request_id.encode(), len(partitions))]
        headers = [("content-type", b"application/json"), (DELIVERY_HEADER, delivery.encode())]
        sent = [
            await producer.send(
                topic,
                stored_result(rid).model_dump_json().encode(),
                key=rid.encode(),
                partition=partition,
                headers=headers if rid == request_id else headers[:1],
            )
            for rid in (f"before-{request_id}", request_id, f"after-{request_id}")
        ]
        offsets = [(await future).offset for future in sent]
    finally:
        await producer.stop()
    assert offsets == [offsets[0], offsets[0] + 1, offsets[0] + 2]

    assert await stack.workers["fast"].sent.was_sent(topic, request_id, delivery, since_ms)
    assert not await stack.workers["fast"].sent.was_sent(
        topic, request_id, f"{delivery}0", since_ms
    )
