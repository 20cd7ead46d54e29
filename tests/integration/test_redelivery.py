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
from services.common.kafka import ensure_topics, partition_for_key
from services.common.tansu import log_ends
from services.workers.adapters.outcomes import RedisOutcomeStore, Stored
from services.workers.adapters.sent import DELIVERY_HEADER
from services.workers.app import WorkerApp
from tests.integration.stack import Stack, collect, wait_until

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


def other_worker(worker: WorkerApp, name: str) -> RedisOutcomeStore:
    """The outcome store of another worker process, as far as ``worker`` can tell. Not started,
    it holds no lease: a worker that is gone."""
    return RedisOutcomeStore(worker.settings.redis_url, worker.settings.topic_prefix, name)


async def publish_answer(stack: Stack, result: ChatResult, delivery: str) -> None:
    """What a worker's publish of ``result`` in answer to ``delivery`` puts on the results topic."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            stack.topics.results,
            result.model_dump_json().encode(),
            key=result.request_id.encode(),
            headers=[(DELIVERY_HEADER, delivery.encode())],
        )
    finally:
        await producer.stop()


def kept(record: ConsumerRecord, result: ChatResult) -> tuple[str, Stored, str]:
    """What a worker stores for ``record`` answered with ``result``: where, what, for whom."""
    routed = json.loads(record.value)
    payload = result.model_dump_json().encode()
    return routed["outcome_key"], Stored(payload, routed["fingerprint"]), result.request_id


def delivery_of(record: ConsumerRecord) -> str:
    return f"{record.topic}:{record.partition}:{record.offset}"


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

    await worker.handler(record)  # and again: the search marked it sent, no need to look
    assert len(await answers(stack, request_id)) == 1
    assert worker.service.already_sent == 2
    assert worker.sent.searches == 1


async def test_an_answer_out_but_not_marked_sent_is_found_on_the_topic(fast_stack: Stack) -> None:
    """A worker killed after the broker took its answer and before it marked the delivery sent:
    the next owner looks on the results topic, finds the answer, sends nothing."""
    stack = fast_stack
    worker = stack.workers["fast"]
    record = routed_record(stack, f"unmarked-{uuid.uuid4().hex}", offset=5150)
    request_id = json.loads(record.value)["request"]["request_id"]
    gone = other_worker(worker, "killed")
    try:
        result = stored_result(request_id)
        await gone.put(*kept(record, result), delivery_of(record), stack.topics.results)
        await publish_answer(stack, result, delivery_of(record))
    finally:
        await gone.close()

    await worker.handler(record)

    assert len(await answers(stack, request_id)) == 1
    assert worker.service.already_sent == 1
    assert worker.sent.searches == 1
    assert worker.service.taken_over == 0


async def test_a_record_whose_answer_was_noted_but_never_sent_is_answered(
    fast_stack: Stack,
) -> None:
    stack = fast_stack
    worker = stack.workers["fast"]
    record = routed_record(stack, f"cut-{uuid.uuid4().hex}", offset=7)
    request_id = json.loads(record.value)["request"]["request_id"]
    stored = stored_result(request_id)
    # what a worker killed between storing its answer and publishing it leaves behind
    gone = other_worker(worker, "killed")
    try:
        await gone.put(*kept(record, stored), delivery_of(record), stack.topics.results)
    finally:
        await gone.close()

    await worker.handler(record)

    sent = await answers(stack, request_id)
    assert len(sent) == 1 and sent[0]["model"] == "sim-light"
    assert worker.service.already_sent == 0
    assert worker.service.replayed == 1  # from the store: no model call
    assert worker.service.taken_over == 1
    assert worker.sent.searches == 1  # looked once the owner was known to be gone


async def test_a_living_owner_still_sending_is_waited_for(fast_stack: Stack) -> None:
    """The group gave the records to this worker while their last owner, alive (it missed its
    heartbeats, or is slow to give the partition up), is still sending the answers: this worker
    waits for it, however long the sends take, and sends nothing. It finds one answer marked
    sent (by another worker's search) and the other on the topic."""
    stack = fast_stack
    worker = stack.workers["fast"]
    records = [routed_record(stack, f"slow-{uuid.uuid4().hex}", offset=8080 + i) for i in (0, 1)]
    request_ids = [json.loads(r.value)["request"]["request_id"] for r in records]
    results = [stored_result(request_id) for request_id in request_ids]
    owner = other_worker(worker, "slow")
    await owner.start()
    try:
        for record, result in zip(records, results, strict=True):
            await owner.put(*kept(record, result), delivery_of(record), stack.topics.results)
        handling = [asyncio.create_task(worker.handler(record)) for record in records]
        await wait_until(lambda: _true(worker.service.waited == 2), what="the worker waits")
        for record, result in zip(records, results, strict=True):
            await publish_answer(stack, result, delivery_of(record))
        await owner.sent(request_ids[0], delivery_of(records[0]))
        await asyncio.wait_for(asyncio.gather(*handling), 30)
    finally:
        await owner.close()

    for request_id in request_ids:
        assert len(await answers(stack, request_id)) == 1
    assert worker.service.already_sent == 2
    assert worker.service.taken_over == 0
    assert worker.sent.searches >= 3  # at the start of each wait, and the one that found it


async def test_a_living_owner_that_stops_without_sending_is_taken_over(fast_stack: Stack) -> None:
    stack = fast_stack
    worker = stack.workers["fast"]
    record = routed_record(stack, f"stopped-{uuid.uuid4().hex}", offset=9090)
    request_id = json.loads(record.value)["request"]["request_id"]
    owner = other_worker(worker, "stopping")
    await owner.start()
    try:
        stored = stored_result(request_id)
        await owner.put(*kept(record, stored), delivery_of(record), stack.topics.results)
        handling = asyncio.create_task(worker.handler(record))
        await wait_until(lambda: _true(worker.service.waited == 1), what="the worker waits")
        assert not handling.done()
    finally:
        await owner.close()  # gone: its lease with it
    await asyncio.wait_for(handling, 30)

    assert len(await answers(stack, request_id)) == 1
    assert worker.service.taken_over == 1


async def test_of_two_takers_of_a_gone_owners_note_one_wins(fast_stack: Stack) -> None:
    worker = fast_stack.workers["fast"]
    request_id, delivery = f"race-{uuid.uuid4().hex}", "tier:0:1"
    stores = [other_worker(worker, name) for name in ("gone", "taker-a", "taker-b")]
    try:
        assert await stores[0].sending(request_id, delivery, "results") is None
        note = await stores[1].note(request_id, delivery)
        assert note is not None and note.owner == stores[0].owner
        assert not await stores[1].alive(note.owner)
        won = await asyncio.gather(*(s.take_over(request_id, delivery, note) for s in stores[1:]))
        assert sorted(won) == [False, True]
        now = await stores[0].note(request_id, delivery)
        assert now is not None and now.owner == stores[1 + won.index(True)].owner
        assert now.at_ms == note.at_ms  # the search window stays the first sender's
    finally:
        for store in stores:
            await store.close()


async def test_two_owners_handling_one_record_at_once_send_one_answer(fast_stack: Stack) -> None:
    """The group handed the partition back to the worker still finishing the record: two
    handlers of one process call the model, one answer goes out."""
    stack = fast_stack
    worker = stack.workers["fast"]
    record = routed_record(stack, f"zombie-{uuid.uuid4().hex}", offset=99)
    request_id = json.loads(record.value)["request"]["request_id"]

    await asyncio.gather(worker.handler(record), worker.handler(record))

    assert len(await answers(stack, request_id)) == 1
    assert worker.service.already_sent == 1


async def _true(value: bool) -> bool:
    return value


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


async def test_a_search_finds_answers_on_a_topic_after_searching_another(
    fast_stack: Stack,
) -> None:
    """A worker searches the results topic for one redelivery and a router's reply topic for the
    next (or the other way round). The search's consumer, once assigned one topic, used to forget
    the others on its next metadata refresh, take the answer's topic for one that does not exist,
    and send the answer again: 6 of 5,000 jobs answered twice in a CI run's crash scenario."""
    stack = fast_stack
    worker = stack.workers["fast"]
    results = [stored_result(f"two-topics-{uuid.uuid4().hex}") for _ in range(2)]
    deliveries = [f"t:0:{i}" for i in range(2)]
    other = stack.topics.replies(f"gone-{uuid.uuid4().hex[:8]}")
    await ensure_topics(stack.bootstrap, [other], 2)
    for result, delivery in zip(results, deliveries, strict=True):
        await publish_answer(stack, result, delivery)
    since = int(time.time() * 1000) - 60_000
    assert not await worker.sent.was_sent(other, "nobody", "t:0:9", since)  # assigned there
    for result, delivery in zip(results, deliveries, strict=True):
        assert await worker.sent.was_sent(stack.topics.results, result.request_id, delivery, since)
        assert not await worker.sent.was_sent(other, result.request_id, delivery, since)
