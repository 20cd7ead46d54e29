"""Events read again after a crash are stored once, whatever batch they come back in (real chDB,
and the real broker for the assignment).

A metrics writer that dies between inserting a batch and committing it leaves its partitions'
next owner to read those events again, in batches that start at the committed offset but end
wherever that fetch ends: the insert token (a hash of the batch's event ids) differs, so only
looking the events up keeps them from being stored twice. The consumer tells the handler, per
assigned partition, which offsets those are: from the group's committed offset to the end.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import Topics
from schemas.v1 import AttemptEvent
from services.common.consumer import BatchConsumer
from services.common.kafka import KafkaBatchPublisher, Outgoing, ensure_topics
from services.metrics.adapters.store import ClickHouseStore
from services.metrics.handlers import BatchHandler
from tests.integration.stack import SEND_S, START_S, STOP_S, wait_until, within


class NoDeadLetters:
    """Where dead letters would go; these batches have none, so nothing may arrive here."""

    async def publish_all(self, messages: Sequence[Outgoing]) -> None:
        raise AssertionError(f"unexpected dead letters: {messages}")


def records(events: list[AttemptEvent], first_offset: int) -> list[ConsumerRecord]:
    out = []
    for i, e in enumerate(events):
        value = e.model_dump_json().encode()
        out.append(
            ConsumerRecord(
                "events", 0, first_offset + i, 0, 0, None, value, None, 0, len(value), ()
            )
        )
    return out


EVENTS_0 = TopicPartition("events", 0)


def events(n: int) -> list[AttemptEvent]:
    return [
        AttemptEvent(
            ts=datetime.now(UTC),
            request_id=f"r{i}",
            tier="fast",
            model="m",
            provider="openai",
            rule="r",
            config_hash="h",
            attempt=0,
            status="ok",
        )
        for i in range(n)
    ]


def test_a_range_read_again_in_other_batches_is_stored_once(chdb_data_dir: Path) -> None:
    database = f"recheck_{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[int, int, int]:
        store = ClickHouseStore(f"chdb://{chdb_data_dir}", database)
        try:
            await store.migrate()
            all_events = events(300)
            crashed = BatchHandler(store, NoDeadLetters(), Topics("t"), "metrics-a")
            await crashed(records(all_events[:100], 0))  # inserted...
            await crashed(records(all_events[100:150], 100))  # ...and never committed
            after = BatchHandler(store, NoDeadLetters(), Topics("t"), "metrics-b")
            after.assigned({EVENTS_0: range(0, 150)})  # what the consumer tells it
            await after(records(all_events[0:120], 0))  # the same range, other boundaries
            await after(records(all_events[120:300], 120))
            _, rows = await store.query(
                f"SELECT count(), uniqExact(event_id) FROM {database}.llm_events"
            )
            return rows[0][0], rows[0][1], after.already_stored
        finally:
            await store.close()

    count, distinct, already = asyncio.run(go())
    assert (count, distinct) == (300, 300)
    assert already == 150


def test_without_a_recheck_batches_are_not_looked_up(chdb_data_dir: Path) -> None:
    """The lookup is paid only for unsettled records: a normal batch goes straight in."""
    database = f"recheck_{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[int, int, int]:
        store = ClickHouseStore(f"chdb://{chdb_data_dir}", database)
        try:
            await store.migrate()
            handler = BatchHandler(store, NoDeadLetters(), Topics("t"), "metrics")
            batch = events(50)
            await handler(records(batch, 0))
            handler.assigned({EVENTS_0: range(0, 0), TopicPartition("events", 1): range(0, 50)})
            await handler(records(events(50), 50))
            _, rows = await store.query(f"SELECT count() FROM {database}.llm_events")
            return rows[0][0], handler.already_stored, handler.lookups
        finally:
            await store.close()

    assert asyncio.run(go()) == (100, 0, 0)


class FailingOnce:
    """The store, whose first lookup fails as a ClickHouse that went away would."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.store, self.failed = store, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def stored(self, rows: pa.Table) -> set[str]:
        if not self.failed:
            self.failed = True
            raise ConnectionError("ClickHouse went away")
        return await self.store.stored(rows)


def test_a_lookup_that_failed_is_made_when_the_batch_is_retried(chdb_data_dir: Path) -> None:
    database = f"recheck_{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[int, int, int]:
        store = ClickHouseStore(f"chdb://{chdb_data_dir}", database)
        try:
            await store.migrate()
            all_events = events(100)
            crashed = BatchHandler(store, NoDeadLetters(), Topics("t"), "metrics-a")
            await crashed(records(all_events[:60], 0))
            after = BatchHandler(FailingOnce(store), NoDeadLetters(), Topics("t"), "metrics-b")  # type: ignore[arg-type]
            after.assigned({EVENTS_0: range(0, 60)})
            batch = records(all_events, 0)
            with pytest.raises(ConnectionError):
                await after(batch)
            await after(batch)  # the consumer's retry
            _, rows = await store.query(
                f"SELECT count(), uniqExact(event_id) FROM {database}.llm_events"
            )
            return rows[0][0], rows[0][1], after.already_stored
        finally:
            await store.close()

    assert asyncio.run(go()) == (100, 100, 60)


async def committed_is(bootstrap: str, group: str, tps: list[TopicPartition], n: int) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await within(START_S, "an admin client to start", admin.start())
    try:
        offsets = await within(
            SEND_S, "committed offsets", admin.list_consumer_group_offsets(group, partitions=tps)
        )
        return sum(max(o.offset, 0) for o in offsets.values()) == n
    finally:
        await within(STOP_S, "an admin client to stop", admin.close())


async def read_back(bootstrap: str, tps: list[TopicPartition], n: int) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=20)
    await within(START_S, "a reader to start", consumer.start())
    try:
        consumer.assign(tps)
        await within(SEND_S, "seeking to the start", consumer.seek_to_beginning(*tps))
        seen: list[ConsumerRecord] = []
        async with asyncio.timeout(SEND_S):
            while len(seen) < n:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    seen.extend(batch)
        return seen
    finally:
        await within(STOP_S, "a reader to stop", consumer.stop())


async def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit for ``group`` as its previous owner did before it crashed."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await within(START_S, "a committer to start", consumer.start())
    try:
        consumer.assign(list(offsets))
        await within(SEND_S, "a commit", consumer.commit(offsets))
    finally:
        await within(STOP_S, "a committer to stop", consumer.stop())


async def publish(publisher: KafkaBatchPublisher, topic: str, n: int) -> None:
    """``n`` events as one record batch per partition."""
    messages = [Outgoing(topic, e.model_dump_json().encode()) for e in events(n)]
    await within(SEND_S, f"{n} events to be stored", publisher.publish_all(messages))


@pytest.mark.integration
@pytest.mark.timeout(150)
async def test_the_next_owner_looks_up_what_a_crashed_one_left_uncommitted(
    kafka_bootstrap: str, topic_prefix: str, chdb_data_dir: Path
) -> None:
    """Each partition's records sit in one record batch, whose end the embedded broker reports
    as its first offset + 1: a range ending there would leave most of them to be stored twice."""
    topic, group = f"{topic_prefix}.events", f"{topic_prefix}-metrics"
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    await within(START_S, "the topic", ensure_topics(kafka_bootstrap, [topic], 2))
    publisher = KafkaBatchPublisher(kafka_bootstrap, "recheck-test")
    store = ClickHouseStore(f"chdb://{chdb_data_dir}", f"recheck_{uuid.uuid4().hex[:8]}")
    crashed = BatchHandler(store, NoDeadLetters(), Topics("t"), "metrics-a")
    handler = BatchHandler(store, NoDeadLetters(), Topics("t"), "metrics-b")
    told: list[dict[TopicPartition, range]] = []

    def on_assign(unsettled: dict[TopicPartition, range]) -> None:
        told.append(unsettled)
        handler.assigned(unsettled)

    consumer = BatchConsumer(
        bootstrap=kafka_bootstrap,
        topics=[topic],
        group_id=group,
        handler=handler,
        max_records=1000,
        fetch_max_wait_ms=20,
        client_id="recheck-test",
        on_assign=on_assign,
    )
    await within(START_S, "the publisher to start", publisher.start())
    try:
        await store.migrate()
        await publish(publisher, topic, 60)
        written = await read_back(kafka_bootstrap, tps, 60)
        by_partition = {p: [r for r in written if r.partition == p] for p in (0, 1)}
        assert [len(v) for v in by_partition.values()] == [30, 30]
        # The owner that crashed: inserted 0-19 of partition 0 (committed up to 10) and all of
        # partition 1 (committed nothing).
        await crashed(by_partition[0][:20] + by_partition[1])
        await commit(kafka_bootstrap, group, {tps[0]: 10})

        await within(START_S, "the consumer to start", consumer.start())
        await wait_until(lambda: committed_is(kafka_bootstrap, group, tps, 60), 60)
        assert told == [{tps[0]: range(10, 30), tps[1]: range(0, 30)}]
        assert handler.already_stored == 40
        lookups = handler.lookups
        # Records written after the assignment are past the ranges: not looked up.
        await publish(publisher, topic, 20)
        await wait_until(lambda: committed_is(kafka_bootstrap, group, tps, 80), 60)
        assert handler.lookups == lookups
        _, rows = await store.query(f"SELECT count(), uniqExact(event_id) FROM {store.table}")
        assert rows == [[80, 80]]
    finally:
        await within(STOP_S, "the consumer to stop", consumer.stop())
        await within(STOP_S, "the publisher to stop", publisher.stop())
        handler.close()
        crashed.close()
        await store.close()
