"""The router's broker watch: callers waiting for answers get a 503 at once when Kafka goes away
or comes back without the router's reply topic. A broker of its own (the test kills it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.v1 import ChatError
from services.common.kafka import delete_topics, ensure_topics
from services.common.tansu import log_ends
from services.router.errors import ApiError
from services.router.service import PendingReplies
from services.router.watch import BrokerWatch
from switchboard.embedded import Child, start_broker
from tests.integration.stack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def failure(future: asyncio.Future[object]) -> ApiError:
    async with asyncio.timeout(30):
        with pytest.raises(ApiError) as caught:
            await asyncio.shield(future)
    return caught.value


async def test_waiting_callers_get_a_503_when_the_broker_dies(
    own_broker: tuple[Child, str], topic_prefix: str
) -> None:
    broker, bootstrap = own_broker
    reply_topic = f"{topic_prefix}.replies.r1"
    await ensure_topics(bootstrap, [reply_topic], 1)
    replies = PendingReplies()
    watch = BrokerWatch(bootstrap, lambda: reply_topic, replies)
    await watch.start()
    try:
        future, _ = replies.expect("req-1")
        assert not future.done()
        broker.proc.kill()  # no shutdown, no goodbye
        error = await failure(future)  # type: ignore[arg-type]
        assert error.status == 503
        assert error.body()["error"]["code"] == "broker_unavailable"
        assert "Idempotency-Key" in error.body()["error"]["message"]
        assert len(replies) == 0 and watch.failed_callers == 1
    finally:
        await watch.stop()


async def test_waiting_callers_get_a_503_when_the_reply_topic_is_gone(
    own_broker: tuple[Child, str], topic_prefix: str
) -> None:
    _, bootstrap = own_broker
    replies = PendingReplies()
    # the reply topic was never created: what a broker restarted without its data looks like
    watch = BrokerWatch(bootstrap, lambda: f"{topic_prefix}.replies.gone", replies)
    await watch.start()
    try:
        future, _ = replies.expect("req-2")
        error = await failure(future)  # type: ignore[arg-type]
        assert error.status == 503 and "reply topic" in error.body()["error"]["message"]
    finally:
        await watch.stop()


async def test_nothing_fails_while_the_broker_is_healthy(
    own_broker: tuple[Child, str], topic_prefix: str
) -> None:
    _, bootstrap = own_broker
    reply_topic = f"{topic_prefix}.replies.ok"
    await ensure_topics(bootstrap, [reply_topic], 1)
    replies = PendingReplies()
    watch = BrokerWatch(bootstrap, lambda: reply_topic, replies)
    await watch.start()
    try:
        future, _ = replies.expect("req-3")

        async def probed() -> bool:
            return watch.probes >= 3

        await wait_until(probed, 30)
        assert not future.done() and watch.failed_callers == 0
    finally:
        await watch.stop()


async def test_readiness_turns_false_while_callers_wait_and_no_answer_comes(
    own_broker: tuple[Child, str], topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, bootstrap = own_broker
    reply_topic = f"{topic_prefix}.replies.stall"
    await ensure_topics(bootstrap, [reply_topic], 1)
    replies = PendingReplies()
    watch = BrokerWatch(bootstrap, lambda: reply_topic, replies, stall_s=1.5)
    await watch.start()
    try:
        assert watch.not_ready() is None
        replies.expect("req-stalled")

        async def stalled() -> str | None:
            return watch.not_ready()

        reason = await wait_until(stalled, 30, "readiness to turn false")
        assert "1 callers waiting and no answer" in reason
        assert any("router not ready" in r.getMessage() for r in caplog.records)
        replies.resolve(ChatError(request_id="req-stalled", code="x", message="answered"))

        async def ready_again() -> bool:
            return watch.not_ready() is None

        await wait_until(ready_again, 30, "readiness to come back")
    finally:
        await watch.stop()


async def test_a_topic_the_keeper_is_compacting_is_not_lost(
    own_broker: tuple[Child, str], topic_prefix: str
) -> None:
    """The embedded broker's keeper deletes and creates a topic again while writers hold: the
    router must neither refuse requests nor create the topic itself in those milliseconds."""
    _, bootstrap = own_broker
    reply_topic, shared = f"{topic_prefix}.replies.k", f"{topic_prefix}.tier.k"
    await ensure_topics(bootstrap, [reply_topic, shared], 1)
    held = {shared}
    watch = BrokerWatch(
        bootstrap,
        lambda: reply_topic,
        PendingReplies(),
        topics=[shared],
        compacting=held.__contains__,
    )
    await watch.start()
    try:
        await delete_topics(bootstrap, [shared])
        probes = watch.probes

        async def probed() -> bool:
            return watch.probes >= probes + 2

        await wait_until(probed, 30)
        assert watch.ready and watch.not_ready() is None
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            assert shared not in await consumer.topics()  # the watch did not create it
        finally:
            await consumer.stop()
        held.clear()  # a hold that ends with the topic still missing: now it is lost
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:

            async def created_again() -> bool:
                return shared in await consumer.topics()

            await wait_until(created_again, 30, "the watch to create the lost topic")
        finally:
            await consumer.stop()
    finally:
        await watch.stop()


async def test_a_lost_reply_topic_is_created_again_without_what_was_written_to_it_meanwhile(
    own_broker: tuple[Child, str], topic_prefix: str
) -> None:
    """Workers still answering requests from before a restart write to the reply topic while it
    does not exist; the broker stores those writes, and a topic created over them would lose
    later answers. The watch deletes them and creates the topic empty."""
    _, bootstrap = own_broker
    reply_topic = f"{topic_prefix}.replies.renewed"
    await ensure_topics(bootstrap, [reply_topic], 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await producer.start()
    replies = PendingReplies()
    watch = BrokerWatch(bootstrap, lambda: reply_topic, replies)
    try:
        await producer.send_and_wait(reply_topic, b"before")  # the producer knows the topic
        await delete_topics(bootstrap, [reply_topic])  # what a restart does to it
        late = [await producer.send(reply_topic, b"late", partition=0) for _ in range(3)]
        await asyncio.gather(*late)  # stored, though the topic is gone

        await watch.start()
        future, _ = replies.expect("req-4")
        error = await failure(future)  # type: ignore[arg-type]
        assert error.status == 503 and watch.renewed == 1

        answer = await producer.send_and_wait(reply_topic, b"answer", partition=0)
        assert answer.offset == 0
        assert await read_all(bootstrap, reply_topic) == [b"answer"]
    finally:
        await watch.stop()
        await producer.stop()


async def read_all(bootstrap: str, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        end = (await log_ends(consumer, [tp]))[tp]
        await consumer.seek_to_beginning(tp)
        values: list[bytes] = []
        while await consumer.position(tp) < end:
            values += [r.value for r in (await consumer.getmany(tp, timeout_ms=200)).get(tp, [])]
        return values
    finally:
        await consumer.stop()


async def test_while_the_broker_is_away_requests_are_held_back_and_lost_topics_come_back(
    own_broker: tuple[Child, str], topic_prefix: str, logs_dir: Path
) -> None:
    broker, bootstrap = own_broker
    reply_topic = f"{topic_prefix}.replies.back"
    shared = [f"{topic_prefix}.tier.a", f"{topic_prefix}.events"]
    await ensure_topics(bootstrap, [reply_topic, *shared], 1)
    watch = BrokerWatch(
        bootstrap, lambda: reply_topic, PendingReplies(), topics=shared, partitions=3
    )
    await watch.start()
    restarted: Child | None = None
    try:
        assert watch.ready
        broker.proc.kill()
        broker.proc.wait()

        async def away() -> bool:
            return not watch.ready

        await wait_until(away, 30)
        restarted = start_broker(int(bootstrap.rsplit(":", 1)[1]), logs_dir)  # empty

        async def back() -> bool:
            return watch.ready

        await wait_until(back, 30)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            assert {reply_topic, *shared} <= await consumer.topics()
            assert len(consumer.partitions_for_topic(shared[0]) or ()) == 3
            assert consumer.partitions_for_topic(reply_topic) == {0}
        finally:
            await consumer.stop()
        assert watch.renewed == 1
    finally:
        await watch.stop()
        if restarted is not None:
            restarted.stop()
