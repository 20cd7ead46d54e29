"""A batch of event records → rows in ClickHouse; unreadable records become dead letters."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from schemas.topics import Topics
from schemas.v1 import AttemptEvent
from services.common.deadletter import from_record
from services.common.kafka import Publisher
from services.metrics.adapters.store import EventStore


class BatchHandler:
    def __init__(self, store: EventStore, publisher: Publisher, topics: Topics, name: str) -> None:
        self.store, self.publisher, self.topics, self.name = store, publisher, topics, name
        self.inserted = 0
        self.dead_letters = 0

    async def __call__(self, records: Sequence[ConsumerRecord]) -> None:
        events: list[AttemptEvent] = []
        bad: list[tuple[ConsumerRecord, Exception]] = []
        for record in records:
            try:
                events.append(AttemptEvent.model_validate_json(record.value or b""))
            except ValidationError as exc:
                bad.append((record, exc))
        await self._insert_then_report(events, bad)

    async def _insert_then_report(
        self, events: list[AttemptEvent], bad: list[tuple[ConsumerRecord, Exception]]
    ) -> None:
        # Insert first: if it fails the batch is retried whole, dead letters included, so
        # dead letters are published once the batch is known to go through.
        await self.store.insert(events)
        self.inserted += len(events)
        for record, error in bad:
            letter = from_record(record, self.name, error)
            await self.publisher.publish(self.topics.dead_letter, letter)
            self.dead_letters += 1
