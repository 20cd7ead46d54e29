"""A batch of event records → rows in ClickHouse; unreadable records become dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from aiokafka import ConsumerRecord

from schemas.topics import Topics
from services.common.deadletter import from_record
from services.common.kafka import BatchPublisher, Outgoing
from services.metrics.adapters.store import EventStore
from services.metrics.domain.columns import decode, dedup_token


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
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def close(self) -> None:
        self._decoder.shutdown(wait=True)

    async def __call__(self, records: Sequence[ConsumerRecord]) -> None:
        values = [r.value for r in records]
        decoded = await asyncio.get_running_loop().run_in_executor(self._decoder, decode, values)
        # Insert first: if it fails the batch is retried whole, dead letters included, so
        # dead letters are published once the batch is known to go through.
        await self.store.insert_table(decoded.table, dedup_token(decoded.event_ids()))
        self.inserted += decoded.table.num_rows
        if decoded.refused:
            letters = [
                from_record(records[i], self.name, exc).model_dump_json().encode()
                for i, exc in decoded.refused
            ]
            await self.publisher.publish_all(
                [Outgoing(self.topics.dead_letter, v) for v in letters]
            )
            self.dead_letters += len(letters)
