"""Batches of records → rows in ClickHouse; unreadable (or refused) records become dead letters.

``BatchHandler``: the events topic → llm_events. ``RecordsHandler``: the low-volume topics
(decisions, shadow comparisons, feedback) → their tables."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import ConsumerRecord, TopicPartition

from schemas.control import Feedback
from schemas.topics import Topics
from services.common import telemetry
from services.common.deadletter import from_record
from services.common.kafka import BatchPublisher, Outgoing
from services.common.retry import Transient
from services.common.sql import literal
from services.metrics.adapters.store import EventStore, StoreUnavailable
from services.metrics.domain.columns import Decoded, decode, dedup_token
from services.metrics.domain.records import NotYet, feedback_refusals, record_tables
from services.metrics.domain.records import dedup_token as records_token

log = logging.getLogger(__name__)

_NONE = range(0)


class _Unsettled:
    """Per partition, the offsets whose records may have rows already (``BatchHandler.assigned``).

    A range only shrinks from its start, once a batch that holds its first offset is stored: two
    batches are handled at once, and a later one stored first must not let an earlier one that
    is being retried skip its lookup. So a range may keep offsets already stored (a later batch
    stored first, a first offset never handed to this handler); a record there read again is
    looked up again, which costs a lookup and nothing else.
    """

    def __init__(self) -> None:
        self.ranges: dict[tuple[str, int], range] = {}
        self.assignment = 0  # which assignment ``ranges`` belong to

    def reset(self, unsettled: Mapping[TopicPartition, range]) -> None:
        self.ranges = {(tp.topic, tp.partition): r for tp, r in unsettled.items() if r}
        self.assignment += 1

    def mask(self, records: Sequence[ConsumerRecord]) -> pa.Array | None:
        """Which records are in a range, or None when none can be."""
        if not self.ranges:
            return None
        ranges = self.ranges
        return pa.array([r.offset in ranges.get((r.topic, r.partition), _NONE) for r in records])

    def settle(self, records: Sequence[ConsumerRecord], assignment: int) -> None:
        """``records`` are stored (looked up, inserted, dead letters out): ranges move past them."""
        if assignment != self.assignment or not self.ranges:
            return  # a batch of an earlier assignment says nothing about this one's ranges
        spans: dict[tuple[str, int], tuple[int, int]] = {}
        for r in records:
            low, high = spans.get((r.topic, r.partition), (r.offset, r.offset))
            spans[(r.topic, r.partition)] = (min(low, r.offset), max(high, r.offset))
        for key, (low, high) in spans.items():
            offsets = self.ranges.get(key)
            if offsets is None or low > offsets.start:
                continue
            rest = range(max(offsets.start, high + 1), offsets.stop)
            if rest:
                self.ranges[key] = rest
            else:
                del self.ranges[key]


class BatchHandler:
    """Decodes a batch in a thread of its own, inserts it, then publishes its dead letters.

    Decoding off the event loop matters: Arrow's JSON reader (most of the writer's CPU) runs
    without the GIL, so the loop keeps fetching the next batch from Kafka meanwhile.
    """

    def __init__(
        self, store: EventStore, publisher: BatchPublisher, topics: Topics, name: str
    ) -> None:
        self.store, self.publisher, self.topics, self.name = store, publisher, topics, name
        self.inserted = 0
        self.dead_letters = 0
        self.already_stored = 0  # events read again after a crash whose rows were there
        self.lookups = 0  # batches whose events were looked up before insert
        self._unsettled = _Unsettled()
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def assigned(self, unsettled: Mapping[TopicPartition, range]) -> None:
        """Partitions were just assigned; ``unsettled`` holds, for each, the offsets from the
        group's committed one to the partition's end. Whoever had the partition before may have
        inserted those records and never committed them (it crashed between the two), so they
        are looked up before insert and only the missing ones inserted. Records past the range
        go straight in.

        The insert token alone cannot catch them: a batch read again starts at the committed
        offset but ends wherever this fetch ends, so it is not the batch that was inserted."""
        self._unsettled.reset(unsettled)

    def close(self) -> None:
        self._decoder.shutdown(wait=True)

    async def poisoned(self, record: ConsumerRecord, exc: Exception) -> None:
        """The consumer's ``on_poison``: a record its batch failed on for no transient reason
        (decode refuses bad records itself; this is the net under it)."""
        letter = from_record(record, self.name, exc).model_dump_json().encode()
        await self.publisher.publish_all([Outgoing(self.topics.dead_letter, letter)])
        self.dead_letters += 1
        telemetry.dead_lettered("metrics", record.topic)

    async def __call__(self, records: Sequence[ConsumerRecord]) -> None:
        assignment = self._unsettled.assignment
        values = [r.value for r in records]
        decoded = await asyncio.get_running_loop().run_in_executor(self._decoder, decode, values)
        # Insert first: if it fails the batch is retried whole, dead letters included, so
        # dead letters are published once the batch is known to go through.
        table = await self._not_stored(decoded, records)
        await self.store.insert_table(table, dedup_token(table.column("event_id").combine_chunks()))
        self.inserted += table.num_rows
        telemetry.EVENTS_WRITTEN.inc(table.num_rows)
        if decoded.refused:
            letters = [
                from_record(records[i], self.name, exc).model_dump_json().encode()
                for i, exc in decoded.refused
            ]
            await self.publisher.publish_all(
                [Outgoing(self.topics.dead_letter, v) for v in letters]
            )
            self.dead_letters += len(letters)
            for i, _ in decoded.refused:
                telemetry.dead_lettered("metrics", records[i].topic)
        self._unsettled.settle(records, assignment)

    async def _not_stored(self, decoded: Decoded, records: Sequence[ConsumerRecord]) -> pa.Table:
        """The rows to insert: all of them, less rows of unsettled records that are stored."""
        table = decoded.table
        unsettled = self._unsettled.mask(records)
        if unsettled is None or not table.num_rows:
            return table
        looked_up = pc.take(unsettled, decoded.positions)  # record → row
        if not pc.any(looked_up).as_py():
            return table
        self.lookups += 1
        have = await self.store.stored(table.filter(looked_up))
        if not have:
            return table
        known = pc.and_(
            looked_up,
            pc.is_in(table.column("event_id"), value_set=pa.array(list(have), pa.string())),
        )
        found = pc.sum(known).as_py()
        self.already_stored += found
        log.warning("%d events read again had rows already; not inserted again", found)
        return table.filter(pc.invert(known))


class RecordsHandler:
    """Batches of the low-volume record topics (decisions, shadow comparisons) → their tables.

    A record that does not parse fails its batch; the consumer splits the batch until that
    record is alone and hands it to ``poisoned``, which dead-letters it."""

    def __init__(self, store: EventStore, publisher: BatchPublisher, topics: Topics, name: str):
        self.store = store
        self.publisher = publisher
        self.topics = topics
        self.tables = record_tables(topics)
        self.name = name
        self.inserted = 0
        self.dead_letters = 0
        self.refused = 0  # feedback for unknown requests or another tenant's

    async def __call__(self, records: Sequence[ConsumerRecord]) -> None:
        by_topic: dict[str, list[ConsumerRecord]] = {}
        for record in records:
            by_topic.setdefault(record.topic, []).append(record)
        for topic, batch in by_topic.items():
            spec = self.tables[topic]
            parsed = [spec.schema.model_validate_json(r.value or b"") for r in batch]
            refused: list[tuple[ConsumerRecord, str]] = []
            if spec.checked:
                reasons = await self._feedback_refusals(parsed)  # type: ignore[arg-type]
                refused = [(r, why) for r, why in zip(batch, reasons, strict=True) if why]
                parsed = [p for p, why in zip(parsed, reasons, strict=True) if not why]
            token = records_token([getattr(p, spec.key) for p in parsed])
            rows = [spec.row(p) for p in parsed]
            await self.store.insert_rows(spec.table, spec.columns, rows, token)
            self.inserted += len(rows)
            if refused:  # once the rows are in: a retried batch refuses them again, no more
                letters = [
                    Outgoing(self.topics.dead_letter, _refusal(r, why, self.name))
                    for r, why in refused
                ]
                await self.publisher.publish_all(letters)
                self.refused += len(letters)
                telemetry.dead_lettered("metrics", topic, len(letters))

    async def _feedback_refusals(self, feedback: list[Feedback]) -> list[str | None]:
        ids = sorted({f.request_id for f in feedback})
        sql = (
            f"SELECT request_id, any(tenant_hash) FROM {self.store.table}"
            f" WHERE request_id IN ({', '.join(literal(i) for i in ids)}) GROUP BY request_id"
        )
        try:
            _, rows = await self.store.query(sql)
        except Exception as exc:
            raise StoreUnavailable(
                f"ClickHouse lookup of feedback's requests failed: {exc}"
            ) from exc
        try:
            return feedback_refusals(feedback, {r[0]: r[1] for r in rows}, datetime.now(UTC))
        except NotYet as exc:
            raise FeedbackTooEarly(
                f"feedback for request {exc} came before its row; trying again"
            ) from exc

    async def poisoned(self, record: ConsumerRecord, exc: Exception) -> None:
        letter = from_record(record, self.name, exc).model_dump_json().encode()
        await self.publisher.publish_all([Outgoing(self.topics.dead_letter, letter)])
        self.dead_letters += 1
        telemetry.dead_lettered("metrics", record.topic)


class FeedbackTooEarly(Transient):
    """Feedback whose request's row is not written yet (rows follow answers by about a second)."""


def _refusal(record: ConsumerRecord, reason: str, consumer: str) -> bytes:
    return from_record(record, consumer, Refused(reason)).model_dump_json().encode()


class Refused(ValueError):
    """A record that is well formed and still not stored: its reason says why."""
