"""Events read again after a crash are stored once, whatever batch they come back in (real chDB).

A metrics writer that dies between inserting a batch and committing it leaves its partitions'
next owner to read those events again, in batches that start at the committed offset but end
wherever that fetch ends: the insert token (a hash of the batch's event ids) differs, so only
looking the events up keeps them from being stored twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import ConsumerRecord

from schemas.topics import Topics
from schemas.v1 import AttemptEvent
from services.common.kafka import Outgoing
from services.metrics.adapters.store import ClickHouseStore
from services.metrics.handlers import BatchHandler


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
            after.recheck(200)  # what the consumer does when it is given the partitions
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
    """The lookup is paid only after an assignment: a normal batch goes straight in."""
    database = f"recheck_{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[int, int]:
        store = ClickHouseStore(f"chdb://{chdb_data_dir}", database)
        try:
            await store.migrate()
            handler = BatchHandler(store, NoDeadLetters(), Topics("t"), "metrics")
            batch = events(50)
            await handler(records(batch, 0))
            await handler(records(events(50), 50))
            _, rows = await store.query(f"SELECT count() FROM {database}.llm_events")
            return rows[0][0], handler.already_stored
        finally:
            await store.close()

    assert asyncio.run(go()) == (100, 0)
