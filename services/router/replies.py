"""This router's reply topic: where workers send the answers its HTTP callers wait for.

On Kafka a router has one reply topic for its whole life, and retention bounds it. The embedded
broker (Tansu) applies no retention, and every fetch from a partition costs time in proportion to
the record batches the partition holds (one per answer here): around 12,000 answers its reader
stops getting any (docs/embedded-broker.md). So on the embedded broker (``generation_size`` > 0,
which ``switchboard up`` sets) replies go to generations: after ``generation_size`` requests named
the current one, or as many records came on it (a streamed answer's chunks), new requests name
the next. Generations take turns on ``SLOTS`` topics,
``<reply topic>.s<N>``: a slot is emptied (deleted and created again) just before a new generation
takes it, once no caller waits on the generation that had it before.

Why slots and not a new topic per generation: every producer keeps asking the broker about each
topic it ever wrote to, and Tansu creates a missing topic when asked about it. Deleted
generations came back from every worker every few seconds, and the list each worker asks about
grew with every generation.

``ReplyTopics`` is the bookkeeping; ``ReplyReader`` reads the slots in use (a group-less consumer:
only this router reads its replies) and empties them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas.topics import Topics
from services.common.consumer import close_consumer
from services.common.kafka import delete_topics, ensure_topics
from services.common.retry import cancel_and_wait, describe_error, retry_transient, supervise
from services.common.topic_layout import TopicLayout

log = logging.getLogger(__name__)

MAINTAIN_S = 0.1  # how often generations are checked: a rotation waits at most this long
SLOTS = 3  # reply topics a router takes turns on: the current, the last, one for slow callers
# Partitions of a slot: what the embedded broker gives a topic it creates by itself. Any client
# asking about a topic that does not exist makes Tansu create it, with 4 partitions, and every
# producer that ever wrote to a slot keeps asking about it; so a slot emptied while one asks comes
# back like that, and the reader reads every partition either way.
SLOT_PARTITIONS = 4


class ReplyTopics:
    """Which reply topic new requests name, and which generations callers still wait on."""

    def __init__(self, base: str, generation_size: int = 0) -> None:
        self.base = base
        self.size = generation_size
        self.generation = 0
        self.sent = 0  # requests that named the current generation
        self.received = 0  # records read from the current generation's topic
        self.waiting: dict[int, int] = {0: 0}  # callers waiting, by generation
        self.rotations = 0

    def topic(self, generation: int) -> str:
        return f"{self.base}.s{generation % SLOTS}" if self.size else self.base

    @property
    def current(self) -> str:
        return self.topic(self.generation)

    @property
    def partitions(self) -> int:
        return SLOT_PARTITIONS if self.size else 1

    def slots(self) -> list[str]:
        return [self.topic(g) for g in range(SLOTS)] if self.size else [self.base]

    def live(self) -> list[str]:
        """The topics of the generations in use, current included."""
        return sorted({self.topic(g) for g in self.waiting})

    def take(self) -> str:
        """The topic a new request names; its caller waits on it until ``release``."""
        self.sent += 1
        self.waiting[self.generation] += 1
        return self.current

    def release(self, topic: str) -> None:
        """A caller of the newest generation in ``topic`` no longer waits."""
        for generation in sorted(self.waiting, reverse=True):
            if self.topic(generation) == topic and self.waiting[generation] > 0:
                self.waiting[generation] -= 1
                return

    def full(self) -> bool:
        """A generation holds ``size`` requests, or ``size`` records when there are more of
        those: a streamed answer is many records (its chunks), each a batch the broker's fetches
        pay for."""
        return bool(self.size) and max(self.sent, self.received) >= self.size

    def read(self, topic: str) -> None:
        """A record was read from ``topic``."""
        if topic == self.current:
            self.received += 1

    def next_free(self) -> bool:
        """Whether the next generation's slot is free: nobody waits on the one that had it."""
        self._forget_idle()
        return self.topic(self.generation + 1) not in self.live()

    def rotate(self) -> str:
        """Start the next generation (its slot emptied and read); returns its topic."""
        self.generation += 1
        self.sent = self.received = 0
        self.waiting[self.generation] = 0
        self.rotations += 1
        return self.current

    def _forget_idle(self) -> None:
        for generation in [g for g, n in self.waiting.items() if g < self.generation and not n]:
            del self.waiting[generation]


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
        layout: TopicLayout | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._layout = layout or TopicLayout()
        self.topics = topics
        self._handler = handler
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=fetch_max_wait_ms,
            max_partition_fetch_bytes=self._layout.max_message_bytes,
        )
        self._wanted: set[str] = {topics.current}
        self._applied = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.answers = 0  # records handed to the handler
        self.unhandled = 0  # records the handler failed on for a reason that was not transient
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        current, partitions = self.topics.current, self.topics.partitions
        await ensure_topics(self._bootstrap, [current], partitions, layout=self._layout)
        await self.consumer.start()
        assigned = [TopicPartition(current, p) for p in range(partitions)]
        self.consumer.assign(assigned)
        if not self.topics.size:
            # A topic kept from this router's previous run (a restart; ``keeps_topic``): what
            # it holds answered callers that are gone. Nothing is sent before start returns.
            await self.consumer.seek_to_end(*assigned)
        self._tasks.append(asyncio.create_task(self._read(), name="reply-reader"))
        supervise(self._tasks[-1], "the reply reader", self._stopping)
        if self.topics.size:
            self._tasks.append(asyncio.create_task(self._maintain(), name="reply-generations"))

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks.clear()
        await close_consumer(self.consumer)

    @property
    def keeps_topic(self) -> bool:
        """Whether the reply topic outlives a clean stop: on Kafka, yes; a restart on this host
        reads it again, and answers still coming for this run's callers are stored at once
        instead of each holding a worker until Kafka says the topic is gone. ``ReplySweeper``
        deletes it if no router comes back for it. On the embedded broker (generations) the
        slots are deleted: it keeps everything in memory."""
        return not self.topics.size

    async def delete_all(self) -> None:
        """Delete every reply topic (the router is stopping)."""
        await delete_topics(self._bootstrap, self.topics.slots())

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
        """The handler, again while it fails transiently (its dead-letter publish found Kafka
        away). Anything else is logged and counted, and the reader goes on."""
        self.answers += 1
        self.topics.read(record.topic)
        try:
            await retry_transient("handling a reply", lambda: self._handler(record), self._stopping)
        except Exception as exc:
            self.unhandled += 1
            log.exception(
                "reply %s[%d]@%d could not be handled (%s); skipped",
                record.topic,
                record.partition,
                record.offset,
                describe_error(exc),
            )

    async def _reassign(self) -> None:
        kept: dict[TopicPartition, int] = {}
        for tp in self.consumer.assignment():
            if tp.topic in self._wanted:
                with contextlib.suppress(TimeoutError, KafkaError):
                    kept[tp] = await asyncio.wait_for(self.consumer.position(tp), 1.0)
        wanted = set(kept)
        for topic in self._wanted:
            wanted.update(TopicPartition(topic, p) for p in range(self.topics.partitions))
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
        while True:
            await asyncio.sleep(MAINTAIN_S)  # a check interval, not a wait for something
            try:
                await self._maintain_once()
            except Exception:
                log.exception("reply generations: check failed; trying again")

    async def _maintain_once(self) -> None:
        topics = self.topics
        if not topics.full() or not topics.next_free():
            return
        following = topics.topic(topics.generation + 1)
        await self._apply(set(topics.live()))  # stop reading the slot before it is emptied
        await self._empty(following)
        await self._apply({*topics.live(), following})
        topics.rotate()
        log.debug("reply generations: generation %d on %s", topics.generation, following)

    async def _empty(self, topic: str) -> None:
        """Delete ``topic`` and create it again (see ``SLOT_PARTITIONS``)."""
        await delete_topics(self._bootstrap, [topic])
        await ensure_topics(
            self._bootstrap, [topic], SLOT_PARTITIONS, timeout_s=5.0, layout=self._layout
        )


class ReplySweeper:
    """Deletes reply topics that no running router reads: those of routers that crashed, or of
    a redeploy's replaced pods (a clean stop deletes its own). Every router runs one.

    A router is running while it is a member of the router group (its ingress consumer; a
    member's id begins with its client id, ``router-<instance>-ingress``). A reply topic whose
    router has not been a member for ``grace_s`` (the reply retention: answers older than that
    are gone anyway) is deleted. Deleting twice does no harm, so routers need not agree on who
    sweeps.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        own: Callable[[], list[str]],
        grace_s: float,
        every_s: float | None = None,
    ) -> None:
        self._bootstrap, self._topics, self._own = bootstrap, topics, own
        self._grace_s = grace_s
        self._every_s = every_s if every_s is not None else max(10.0, min(grace_s / 4, 300.0))
        self._orphaned_since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.deleted: list[str] = []

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reply-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # the broker may be away: the next round tries again
                log.warning("reply topics: sweep failed (%s); trying again", describe_error(exc))
            await asyncio.sleep(self._every_s)  # a period, not a wait for something

    async def sweep(self) -> list[str]:
        """One round: note reply topics with no running router; delete those past the grace."""
        now = asyncio.get_running_loop().time()
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, request_timeout_ms=10_000)
        try:
            await admin.start()
            names = [t for t in await admin.list_topics() if self._topics.is_router_reply_topic(t)]
            alive = await _router_members(admin, self._topics.router_group)
            own = set(self._own())
            orphaned = {
                t
                for t in names
                if t not in own
                and not any(m.startswith(_client_of(self._topics, t)) for m in alive)
            }
            for topic in list(self._orphaned_since):
                if topic not in orphaned:
                    del self._orphaned_since[topic]
            for topic in orphaned:
                self._orphaned_since.setdefault(topic, now)
            due = sorted(
                t for t, since in self._orphaned_since.items() if now - since >= self._grace_s
            )
            if due:
                await admin.delete_topics(due)
                for topic in due:
                    del self._orphaned_since[topic]
                self.deleted.extend(due)
                log.info(
                    "reply topics: deleted %s (no router has read them for %.0f s)",
                    due,
                    self._grace_s,
                )
            return due
        finally:
            await admin.close()


def instance_of(topics: Topics, topic: str) -> str:
    """The router instance a reply topic belongs to (a slot's ``.s<N>`` suffix dropped)."""
    instance = topic.removeprefix(topics.reply_prefix)
    base, _, slot = instance.rpartition(".s")
    return base if base and slot.isdigit() else instance


def _client_of(topics: Topics, topic: str) -> str:
    return f"router-{instance_of(topics, topic)}-ingress-"


async def _router_members(admin: AIOKafkaAdminClient, group: str) -> list[str]:
    """The member ids of the router group now (empty: no router runs, or none joined yet)."""
    out: list[str] = []
    for response in await admin.describe_consumer_groups([group]):
        for described in response.to_object()["groups"]:
            out.extend(m["member_id"] for m in described["members"])
    return out
