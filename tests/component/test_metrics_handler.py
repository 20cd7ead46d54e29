"""The metrics writer's batch handler with the store swapped: poison records and the recheck.

After an assignment, records from the group's committed offset to the partition's end at
assignment may have been inserted by a previous owner that never committed them; those (and
only those) are looked up before insert, and what is known of them only moves forward once a
batch is stored.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from aiokafka import ConsumerRecord, TopicPartition

from schemas.topics import Topics
from schemas.v1 import AttemptEvent
from services.common.consumer import _BatchRebalance, _Pauses
from services.common.kafka import Outgoing
from services.metrics.domain.columns import TABLE_SCHEMA
from services.metrics.handlers import BatchHandler
from switchboard.embedded import free_port

TOPIC = "events"


class MemoryStore:
    """The ``EventStore`` a handler uses, in memory; an insert token already seen is skipped
    (ClickHouse's insert deduplication)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.tokens: set[str] = set()
        self.looked_up: list[list[str]] = []
        self.lookup_failures: list[Exception] = []

    async def insert_table(self, table: pa.Table, token: str) -> None:
        assert table.schema == TABLE_SCHEMA
        if token not in self.tokens:
            self.tokens.add(token)
            self.rows.extend(table.to_pylist())

    async def stored(self, rows: pa.Table) -> set[str]:
        if self.lookup_failures:
            raise self.lookup_failures.pop()
        ids = rows.column("event_id").to_pylist()
        self.looked_up.append(ids)
        return set(ids) & {r["event_id"] for r in self.rows}

    def ids(self) -> list[str]:
        return sorted(r["event_id"] for r in self.rows)


class Letters:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def publish_all(self, messages: Sequence[Outgoing]) -> None:
        self.sent.extend(json.loads(m.value) for m in messages)


def event(i: int) -> bytes:
    return AttemptEvent(
        event_id=f"e{i:05d}",
        ts=datetime(2026, 3, 1, tzinfo=UTC),
        request_id=f"r{i}",
        tier="fast",
        model="m",
        provider="openai",
        rule="r",
        config_hash="h",
        attempt=0,
        status="ok",
    ).model_dump_json()


def record(offset: int, value: bytes | None = None, partition: int = 0) -> ConsumerRecord:
    value = event(partition * 10_000 + offset).encode() if value is None else value
    return ConsumerRecord(TOPIC, partition, offset, 0, 0, None, value, None, 0, len(value), ())


def records(first: int, last: int, partition: int = 0) -> list[ConsumerRecord]:
    return [record(o, partition=partition) for o in range(first, last + 1)]


def ids(first: int, last: int, partition: int = 0) -> list[str]:
    return [f"e{partition * 10_000 + o:05d}" for o in range(first, last + 1)]


def handler() -> tuple[BatchHandler, MemoryStore, Letters]:
    store, letters = MemoryStore(), Letters()
    return BatchHandler(store, letters, Topics("t"), "metrics-test"), store, letters  # type: ignore[arg-type]


def tp(partition: int = 0) -> TopicPartition:
    return TopicPartition(TOPIC, partition)


GOOD = event(99).encode()
POISON: dict[str, bytes] = {
    "tokens past int64": GOOD.replace(b'"tokens_in":0', b'"tokens_in":9223372036854775808'),
    "tokens past uint64": GOOD.replace(b'"tokens_in":0', b'"tokens_in":18446744073709551616'),
    "attempt past UInt16": GOOD.replace(b'"attempt":0', b'"attempt":65536'),
    "invalid UTF-8 id": GOOD.replace(b'"e00099"', b'"e\xff\xfe"'),
    "not an object": b"[1, 2]",
}


@pytest.mark.parametrize("name", list(POISON))
async def test_a_poison_record_is_dead_lettered_and_the_normal_one_stored(name: str) -> None:
    h, store, letters = handler()
    h.assigned({tp(): range(0, 10)})  # looked up too: the lookup must not trip on it either
    await h([record(0, POISON[name]), record(1)])
    assert store.ids() == ids(1, 1)
    assert [(d["offset"], d["source_topic"]) for d in letters.sent] == [(0, TOPIC)]
    assert h.dead_letters == 1 and h.inserted == 1


async def test_records_in_the_unsettled_range_are_looked_up_and_others_not() -> None:
    h, store, _ = handler()
    store.rows = [{"event_id": i} for i in ids(10, 14)]  # the previous owner's insert
    h.assigned({tp(0): range(10, 15), tp(1): range(0, 0)})
    await h(records(10, 19) + records(0, 4, partition=1) + records(0, 4, partition=2))
    assert store.looked_up == [ids(10, 14)]
    assert h.already_stored == 5
    assert store.ids() == sorted(ids(10, 14) + ids(15, 19) + ids(0, 4, 1) + ids(0, 4, 2))
    await h(records(20, 29))  # past the range: straight in
    assert len(store.looked_up) == 1 and h.lookups == 1


async def test_a_failed_lookup_is_made_again_when_the_batch_is_retried() -> None:
    """The consumer retries a batch whose handler raised (ClickHouse down): the retry must still
    look its records up, or it would insert again what the previous owner stored."""
    h, store, _ = handler()
    store.rows = [{"event_id": i} for i in ids(0, 9)]
    h.assigned({tp(): range(0, 10)})
    batch = records(0, 14)
    store.lookup_failures.append(ConnectionError("ClickHouse is away"))
    with pytest.raises(ConnectionError):
        await h(batch)
    await h(batch)
    assert store.looked_up == [ids(0, 14)[:10]]
    assert store.ids() == ids(0, 14)


async def test_a_failed_insert_leaves_the_range_to_look_up_again() -> None:
    h, store, _ = handler()
    h.assigned({tp(): range(0, 10)})
    batch = records(0, 9)
    insert = store.insert_table

    async def failing(table: pa.Table, token: str) -> None:
        store.insert_table = insert  # type: ignore[method-assign]
        raise ConnectionError("insert failed")

    store.insert_table = failing  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await h(batch)
    await h(batch)
    assert len(store.looked_up) == 2 and store.ids() == ids(0, 9)


async def test_a_later_batch_stored_first_does_not_end_the_lookups_of_an_earlier_one() -> None:
    """Two batches are in flight at once: the second may be stored while the first is retried."""
    h, store, _ = handler()
    store.rows = [{"event_id": i} for i in ids(0, 19)]
    h.assigned({tp(): range(0, 20)})
    first, second = records(0, 9), records(10, 19)
    store.lookup_failures.append(ConnectionError("ClickHouse is away"))
    with pytest.raises(ConnectionError):
        await h(first)
    await h(second)
    await h(first)  # the retry
    assert store.ids() == ids(0, 19)
    assert h.already_stored == 20


async def test_the_range_shrinks_as_batches_are_stored_then_lookups_stop() -> None:
    h, store, _ = handler()
    h.assigned({tp(): range(0, 20)})
    await h(records(0, 9))
    await h(records(10, 19))
    await h(records(0, 4))  # read again (a rewind): the range has been passed
    assert store.looked_up == [ids(0, 9), ids(10, 19)]
    assert h.lookups == 2


async def test_a_batch_of_an_earlier_assignment_does_not_move_the_new_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch still in flight across a rebalance says nothing about the new assignment."""
    h, store, _ = handler()
    h.assigned({tp(): range(0, 10)})
    looked_up = store.stored

    async def reassigned_meanwhile(rows: pa.Table) -> set[str]:
        h.assigned({tp(): range(0, 10)})
        return await looked_up(rows)

    monkeypatch.setattr(store, "stored", reassigned_meanwhile)
    await h(records(0, 9))
    monkeypatch.setattr(store, "stored", looked_up)
    await h(records(0, 9))  # the new owner's read: still looked up
    assert store.looked_up == [ids(0, 9), ids(0, 9)]
    assert h.already_stored == 10 and store.ids() == ids(0, 9)


async def test_only_rows_of_records_in_range_are_filtered_out() -> None:
    """Refused records shift rows against records; the lookup follows each row's record."""
    h, store, letters = handler()
    store.rows = [{"event_id": i} for i in ids(3, 3)]
    h.assigned({tp(): range(2, 4)})
    batch = [record(0, b"{poison"), record(1, b"[]"), *records(2, 5)]
    await h(batch)
    assert store.looked_up == [ids(2, 3)]
    assert store.ids() == ids(2, 5)
    assert [d["offset"] for d in letters.sent] == [0, 1]
    assert h.already_stored == 1


async def test_partitions_whose_end_cannot_be_read_are_looked_up_from_the_committed_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kafka away while partitions are assigned: no end is known, so every record from the
    committed offset on is looked up (until the next assignment) rather than none."""

    class Owner:
        _bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there

        def __init__(self) -> None:
            self.assigned_events: list[dict[TopicPartition, range]] = []
            self.stopped: set[TopicPartition] = set()
            self._pauses = _Pauses(self)  # type: ignore[arg-type]
            self._consumer = self
            self.assigned = asyncio.Event()

        def on_assign(self, unsettled: dict[TopicPartition, range]) -> None:
            assert self.stopped == {tp(0), tp(1)}, "records read before on_assign knew the ranges"
            self.assigned_events.append(unsettled)

        def pause(self, *tps: TopicPartition) -> None:
            self.stopped.update(tps)

        def resume(self, *tps: TopicPartition) -> None:
            self.stopped.difference_update(tps)

        def paused(self) -> set[TopicPartition]:
            return set(self.stopped)

        def assignment(self) -> set[TopicPartition]:
            return {tp(0), tp(1)}

        async def committed(self, partition: TopicPartition) -> int | None:
            return {0: 7, 1: None}[partition.partition]

        async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            return dict.fromkeys(tps, 0)

    monkeypatch.setattr(_BatchRebalance, "RANGES_TIMEOUT_S", 3.0)
    owner = Owner()
    await _BatchRebalance(owner).on_partitions_assigned([tp(0), tp(1)])
    assert owner.assigned_events == [
        {tp(0): range(7, _BatchRebalance.NO_END), tp(1): range(0, _BatchRebalance.NO_END)}
    ]
    assert owner.assigned.is_set() and not owner.stopped


async def test_a_record_the_consumer_gives_up_on_is_dead_lettered_with_its_reason() -> None:
    h, _, letters = handler()
    await h.poisoned(record(7), RuntimeError("no step foresaw this"))
    assert [(d["offset"], d["error_type"], d["reason"]) for d in letters.sent] == [
        (7, "RuntimeError", "no step foresaw this")
    ]
    assert h.dead_letters == 1
