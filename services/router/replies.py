"""This router's reply topic: where workers send the answers its HTTP callers wait for.

On Kafka a router has one reply topic for its whole life, and retention bounds it. The embedded
broker (Tansu) applies no retention, and every fetch from a partition costs time in proportion to
the record batches the partition holds (one per answer here): around 12,000 answers its reader
stops getting any (docs/embedded-broker.md). So on the embedded broker (``generation_size`` > 0,
which ``switchboard up`` sets) replies go to numbered generations, ``<reply topic>.g<N>``: after
``generation_size`` requests named the current generation, a new one is created and new requests
name it; an older generation is read until no caller waits on it any more, and then deleted.

``ReplyTopics`` is the bookkeeping; ``ReplyReader`` reads every live generation (a group-less
consumer: only this router reads its replies) and creates and deletes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.common.consumer import close_consumer
from services.common.kafka import MAX_MESSAGE_BYTES, delete_topics, ensure_topics

log = logging.getLogger(__name__)

MAINTAIN_S = 0.1  # how often generations are checked: a rotation waits at most this long
STRAYS_EVERY = 50  # every this many checks, deleted generations that came back are deleted again
_HANDLER_BACKOFF_MAX_S = 2.0


class ReplyTopics:
    """Which reply topic new requests name, and which generations callers still wait on."""

    def __init__(self, base: str, generation_size: int = 0) -> None:
        self.base = base
        self.size = generation_size
        self.generation = 0
        self.sent = 0  # requests that named the current generation
        self.waiting: dict[int, int] = {0: 0}  # callers waiting, by generation
        self.rotations = 0
        self.retired = 0
        self._pattern = re.compile(re.escape(base) + r"\.g(\d+)$")

    def topic(self, generation: int) -> str:
        return f"{self.base}.g{generation}" if self.size else self.base

    @property
    def current(self) -> str:
        return self.topic(self.generation)

    def live(self) -> list[str]:
        return [self.topic(g) for g in sorted(self.waiting)]

    def take(self) -> str:
        """The topic a new request names; its caller waits on it until ``release``."""
        self.sent += 1
        self.waiting[self.generation] += 1
        return self.current

    def release(self, topic: str) -> None:
        generation = self.generation_of(topic)
        if generation is not None and self.waiting.get(generation, 0) > 0:
            self.waiting[generation] -= 1

    def generation_of(self, topic: str) -> int | None:
        if not self.size:
            return 0 if topic == self.base else None
        match = self._pattern.match(topic)
        return int(match.group(1)) if match else None

    def full(self) -> bool:
        return bool(self.size) and self.sent >= self.size

    def rotate(self) -> str:
        """Start the next generation (already created and read); returns its topic."""
        self.generation += 1
        self.sent = 0
        self.waiting[self.generation] = 0
        self.rotations += 1
        return self.current

    def idle_old(self) -> list[str]:
        """Older generations nobody waits on any more: to be deleted."""
        return [self.topic(g) for g, n in self.waiting.items() if g < self.generation and n == 0]

    def forget(self, topic: str) -> None:
        generation = self.generation_of(topic)
        if generation is not None and generation != self.generation:
            self.waiting.pop(generation, None)
            self.retired += 1

    def stray(self, existing: set[str]) -> list[str]:
        """Generations that were deleted but exist again: a late answer recreated them."""
        oldest = min(self.waiting)
        out = []
        for name in existing:
            generation = self.generation_of(name)
            if generation is not None and generation < oldest:
                out.append(name)
        return sorted(out)


class ReplyReader:
    """Reads every live reply generation, hands each record to ``handler``, rotates and retires.

    The consumer is reassigned only between fetches, by the reading task, with the positions of
    the partitions it keeps: a rotation neither skips nor repeats an answer.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: ReplyTopics,
        handler: Callable[[ConsumerRecord], Awaitable[None]],
        fetch_max_wait_ms: int,
        client_id: str,
    ) -> None:
        self._bootstrap = bootstrap
        self.topics = topics
        self._handler = handler
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=fetch_max_wait_ms,
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
        )
        self._wanted: set[str] = {topics.current}
        self._applied = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.answers = 0  # records handed to the handler

    async def start(self) -> None:
        await ensure_topics(self._bootstrap, [self.topics.current], 1)
        await self.consumer.start()
        self.consumer.assign([TopicPartition(self.topics.current, 0)])
        self._tasks.append(asyncio.create_task(self._read(), name="reply-reader"))
        if self.topics.size:
            self._tasks.append(asyncio.create_task(self._maintain(), name="reply-generations"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await close_consumer(self.consumer)

    async def delete_all(self) -> None:
        """Delete every live generation (the router is stopping)."""
        await delete_topics(self._bootstrap, self.topics.live())

    # --- reading ------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            if {tp.topic for tp in self.consumer.assignment()} != self._wanted:
                await self._reassign()
            self._applied.set()
            batches = await self.consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    await self._handle(record)

    async def _handle(self, record: ConsumerRecord) -> None:
        """The handler, again after a pause while it raises (it only raises when Kafka does)."""
        delay = 0.05
        while True:
            try:
                await self._handler(record)
                self.answers += 1
                return
            except Exception:
                log.exception("reply handler failed; retrying in %.2fs", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _HANDLER_BACKOFF_MAX_S)

    async def _reassign(self) -> None:
        kept: dict[TopicPartition, int] = {}
        for tp in self.consumer.assignment():
            if tp.topic in self._wanted:
                with contextlib.suppress(TimeoutError, KafkaError):
                    kept[tp] = await asyncio.wait_for(self.consumer.position(tp), 1.0)
        wanted = set(kept)
        for topic in self._wanted:
            partitions = self.consumer.partitions_for_topic(topic) or {0}
            wanted.update(TopicPartition(topic, p) for p in partitions)
        self.consumer.assign(sorted(wanted))
        for tp in wanted:
            if tp in kept:
                self.consumer.seek(tp, kept[tp])
        new = [tp for tp in wanted if tp not in kept]
        if new:
            await self.consumer.seek_to_beginning(*new)

    async def _apply(self, wanted: set[str]) -> None:
        """Have the reading task read exactly ``wanted``, and wait until it does."""
        self._applied.clear()
        self._wanted = wanted
        await self._applied.wait()

    # --- generations --------------------------------------------------------------------------

    async def _maintain(self) -> None:
        checks = 0
        while True:
            await asyncio.sleep(MAINTAIN_S)  # a check interval, not a wait for something
            checks += 1
            try:
                await self._maintain_once(strays=checks % STRAYS_EVERY == 0)
            except Exception:
                log.exception("reply generations: check failed; trying again")

    async def _maintain_once(self, strays: bool = False) -> None:
        topics = self.topics
        if topics.full():
            following = topics.topic(topics.generation + 1)
            await ensure_topics(self._bootstrap, [following], 1, timeout_s=5.0)
            await self._apply({*topics.live(), following})
            topics.rotate()
            log.debug("reply generations: now %s", following)
        idle = topics.idle_old()
        if idle:
            await self._apply(set(topics.live()) - set(idle))
            for topic in idle:
                topics.forget(topic)
            try:
                await delete_topics(self._bootstrap, idle)
            except KafkaError as exc:  # gone already; a stray check finds what is left
                log.warning("reply generations: could not delete %s: %s", idle, exc)
        if strays:
            existing = set(await self.consumer.topics())
            if again := topics.stray(existing):
                log.info(
                    "reply generations: deleting %s again (late answers recreated them)", again
                )
                await delete_topics(self._bootstrap, again)
