"""Was a delivery's answer already written to its topic? Asked when a record comes again with a
note (``adapters/outcomes.py``) that no earlier search marked sent.

A worker notes in Redis which delivery (one tier-topic record) it begins sending the answer of,
and the answer carries the delivery in its ``switchboard-delivery`` header. If the worker dies
(or the group gives up on it) before committing the record, the record's next owner finds the
note: the answer may or may not have reached the broker. This reads the one partition the answer's key maps to, from the note's time
to the end, and looks for that key with that header. Found: nothing is sent again. Not found
(and the noting worker gone): the answer is sent. Either way the client sees it once.

Only redeliveries of records whose answer was being sent pay for this read: a handful per crash.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common.consumer import close_consumer
from services.common.kafka import partition_for_key, partitions_of
from services.common.tansu import log_ends

log = logging.getLogger(__name__)

DELIVERY_HEADER = "switchboard-delivery"
# the note is written just before the publish, by the same process, so the record's timestamp
# (producer create time, same clock) is later; the margin only guards against clock steps
_MARGIN_MS = 5_000
_SCAN_TIMEOUT_S = 30.0


class SentCheck:
    """One group-less consumer, used by one search at a time (searches are rare)."""

    def __init__(self, bootstrap: str, client_id: str) -> None:
        self._bootstrap, self._client_id = bootstrap, client_id
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self.searches = 0

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self._bootstrap,
                client_id=self._client_id,
                enable_auto_commit=False,
                fetch_max_wait_ms=10,
                max_partition_fetch_bytes=16 * 1024 * 1024,
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def was_sent(self, topic: str, key: str, delivery: str, since_ms: int) -> bool:
        async with self._lock:
            self.searches += 1
            return await asyncio.wait_for(
                self._search(topic, key.encode(), delivery.encode(), since_ms), _SCAN_TIMEOUT_S
            )

    async def _search(self, topic: str, key: bytes, delivery: bytes, since_ms: int) -> bool:
        consumer = await self._started()
        partitions = await partitions_of(consumer, topic)
        if not partitions:
            log.info("search for %s: %s does not exist", key.decode(errors="replace"), topic)
            return False  # nothing was written to it
        ordered = sorted(partitions)
        tp = TopicPartition(topic, ordered[partition_for_key(key, len(ordered))])
        consumer.assign([tp])
        found = (await consumer.offsets_for_times({tp: max(0, since_ms - _MARGIN_MS)}))[tp]
        # no record that late: None (Kafka) or timestamp -1 with offset 0 (Tansu, then read all)
        if found is None:
            log.info(
                "search for %s on %s: the broker has no record at or after %d ms",
                key.decode(errors="replace"),
                tp,
                since_ms - _MARGIN_MS,
            )
            return False
        end = (await log_ends(consumer, [tp]))[tp]
        consumer.seek(tp, found.offset)
        read, first, last, same_key = 0, None, None, []
        while await consumer.position(tp) < end:
            for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                if record.offset >= end:
                    break
                read += 1
                first = record.offset if first is None else first
                last = record.offset
                if record.key == key:
                    if (DELIVERY_HEADER, delivery) in (record.headers or ()):
                        return True
                    same_key.append(record.offset)
        log.info(
            "search for %s (%s) on %s: not found; from offset %d (asked for %d ms) to end %d, "
            "read %d records (%s..%s); the key at offsets %s with another delivery",
            key.decode(errors="replace"),
            delivery.decode(errors="replace"),
            tp,
            found.offset,
            since_ms - _MARGIN_MS,
            end,
            read,
            first,
            last,
            same_key,
        )
        return False

    async def close(self) -> None:
        if self._consumer is not None:
            await close_consumer(self._consumer)
            self._consumer = None
