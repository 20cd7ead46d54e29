"""A batch of event records → rows in ClickHouse; unreadable records become dead letters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import ConsumerRecord

from schemas.topics import Topics
from services.common.deadletter import from_record
from services.common.kafka import BatchPublisher, Outgoing
from services.metrics.adapters.store import EventStore
from services.metrics.domain.columns import decode, dedup_token

log = logging.getLogger(__name__)


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
        self._recheck = 0
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def recheck(self, events: int) -> None:
        """The next ``events`` events may have rows already: partitions were just assigned,
        and whoever had them before may have inserted batches it never committed (it crashed
        between the two). Those events are looked up and only the missing ones inserted.

        The insert token alone cannot catch them: a batch read again starts at the committed
        offset but ends wherever this fetch ends, so it is not the batch that was inserted."""
        self._recheck = events

    def close(self) -> None:
        self._decoder.shutdown(wait=True)

    async def __call__(self, records: Sequence[ConsumerRecord]) -> None:
        values = [r.value for r in records]
        decoded = await asyncio.get_running_loop().run_in_executor(self._decoder, decode, values)
        # Insert first: if it fails the batch is retried whole, dead letters included, so
        # dead letters are published once the batch is known to go through.
        table = decoded.table
        if self._recheck > 0 and table.num_rows:
            self._recheck -= table.num_rows
            have = await self.store.stored(table.column("event_id").to_pylist())
            if have:
                known = pc.is_in(table.column("event_id"), value_set=pa.array(sorted(have)))
                table = table.filter(pc.invert(known))
                self.already_stored += len(have)
                log.warning("%d events read again had rows already; not inserted again", len(have))
        await self.store.insert_table(table, dedup_token(table.column("event_id").combine_chunks()))
        self.inserted += table.num_rows
        if decoded.refused:
            letters = [
                from_record(records[i], self.name, exc).model_dump_json().encode()
                for i, exc in decoded.refused
            ]
            await self.publisher.publish_all(
                [Outgoing(self.topics.dead_letter, v) for v in letters]
            )
            self.dead_letters += len(letters)
