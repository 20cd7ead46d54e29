"""Kafka plumbing shared by the services: topic creation, key partitioning and the publishers.

Topics are created explicitly with ``partitions`` partitions: a subscriber-created topic gets one
partition on some brokers, which leaves all but one member of a consumer group idle.

Two publishers: ``BrokerPublisher`` sends one message and waits for it (HTTP callers, workers);
``KafkaBatchPublisher`` sends a whole consumed batch as one record batch per partition and waits
for all of them, which is what lets a consumer commit a batch only once its output is stored
without paying a broker round trip per message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError, UnknownError
from aiokafka.partitioner import murmur2
from faststream.kafka import KafkaBroker
from pydantic import BaseModel

from services.common.fences import Fences
from services.common.tansu import resend_past_unknown_errors
from services.common.topic_layout import DEFAULT_MAX_MESSAGE_BYTES, TopicLayout

log = logging.getLogger(__name__)
T = TypeVar("T")


def track_every_topic() -> None:
    """Make every aiokafka client keep asking the broker about each topic it sends to.

    aiokafka 0.14 asks about all topics until a producer's first send to a topic it has not seen;
    from then on it asks only about the topics added since, and a topic it sent to before, known
    from the full answer, drops out of its metadata. A record still in the producer for such a
    topic then has no partition leader: it waits until it expires (``request_timeout_ms``, 40 s)
    and fails with NotLeaderForPartitionError. A worker hit this whenever a router's reply topic
    was new to it: the answers it held for the router's previous reply topic waited 40 s
    (docs/reliability.md, "A new topic stranded a producer's records"). Adding each topic before
    its first send keeps every topic that has records in the producer in its metadata.
    Applied once, on import of this module, to every client in the process: ours, FastStream's
    and the keeper's.
    """
    if getattr(AIOKafkaClient._wait_on_metadata, "_tracks_every_topic", False):
        return
    wait_on_metadata = AIOKafkaClient._wait_on_metadata

    async def tracked(self: AIOKafkaClient, topic: str) -> Any:
        if topic not in self._topics:
            self.add_topic(topic)
        return await wait_on_metadata(self, topic)

    tracked._tracks_every_topic = True  # type: ignore[attr-defined]
    AIOKafkaClient._wait_on_metadata = tracked  # type: ignore[method-assign]


track_every_topic()

JSON_HEADERS = {"content-type": "application/json"}
_JSON_HEADER_LIST = [("content-type", b"application/json")]
# Largest record, unless SWITCHBOARD_MAX_MESSAGE_BYTES says otherwise: producers' request size,
# topics' max.message.bytes and consumers' fetch sizes all follow the one setting
# (services/common/topic_layout.py). Oversized requests are refused at the door instead.
MAX_MESSAGE_BYTES = DEFAULT_MAX_MESSAGE_BYTES
# What Kafka adds to a record's key and value in a batch of its own (batch header, record
# framing, our headers): a value this much under the limit is taken by the broker.
RECORD_OVERHEAD_BYTES = 4 * 1024
# How often clients refresh topic metadata (aiokafka's default is 5 minutes): a consumer notices
# a topic's new or re-created partitions this soon.
METADATA_MAX_AGE_MS = 5_000
# Record batch size of the batch publisher: a consumed batch leaves as one request per partition.
BATCH_BYTES = 4 * 1024 * 1024
# --- key → partition, as every Kafka client computes it -------------------------------------------
#
# Kafka's default partitioner: murmur2(key) & 0x7fffffff mod partitions (Java's Utils.murmur2).
# One message at a time, aiokafka's own partitioner does it (``BrokerPublisher``). A whole batch
# (``KafkaBatchPublisher``) is hashed here with numpy, one operation per 4-byte word for all keys
# of one length, where aiokafka's pure-Python hash would cost more than the rest of the batch's
# routing (docs/hot-path.md). tests/unit/test_partitioning.py holds the two to the same answers.

_M = 0x5BD1E995
_SEED = 0x9747B28C
_NUMPY_FROM = 8  # keys of one length, at least: below this numpy's fixed cost is not worth it


def partition_for_key(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _murmur2_same_length(keys: Sequence[bytes]) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """murmur2 of many keys of one length, one numpy operation per 4-byte word."""
    length = len(keys[0])
    raw = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), length)
    m = np.uint32(_M)
    h = np.full(len(keys), _SEED ^ length, dtype=np.uint32)
    words = length >> 2
    if words:
        blocks = np.ascontiguousarray(raw[:, : words * 4]).view("<u4")
        for i in range(words):
            k = blocks[:, i] * m
            k = (k ^ (k >> np.uint32(24))) * m
            h = (h * m) ^ k
    tail = length & 3
    base = words * 4
    if tail == 3:
        h ^= raw[:, base + 2].astype(np.uint32) << np.uint32(16)
    if tail >= 2:
        h ^= raw[:, base + 1].astype(np.uint32) << np.uint32(8)
    if tail:
        h = (h ^ raw[:, base].astype(np.uint32)) * m
    h ^= h >> np.uint32(13)
    h = h * m
    return h ^ (h >> np.uint32(15))


def partitions_for_keys(keys: Sequence[bytes], partitions: int) -> list[int]:
    """``partition_for_key`` for every key, computed per group of equal-length keys."""
    out = [0] * len(keys)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(i)
    for indexes in by_length.values():
        if len(indexes) < _NUMPY_FROM:
            for i in indexes:
                out[i] = partition_for_key(keys[i], partitions)
            continue
        hashes = _murmur2_same_length([keys[i] for i in indexes])
        chosen = (hashes & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)
        for i, p in zip(indexes, chosen.tolist(), strict=True):
            out[i] = p
    return out


class RecordTooLarge(ValueError):
    """A record over ``SWITCHBOARD_MAX_MESSAGE_BYTES``: refused before it is sent, since the
    broker would refuse it too. Not transient: a consumer dead-letters the record behind it."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(
            f"a {size:,}-byte record for {topic} is over the {limit:,}-byte limit "
            "(SWITCHBOARD_MAX_MESSAGE_BYTES; the topics' max.message.bytes)"
        )
        self.topic, self.size, self.limit = topic, size, limit


def check_size(topic: str, size: int, limit: int) -> None:
    """Refuse a record whose key, value and headers come to ``size`` bytes, if with Kafka's
    framing it would be over ``limit``."""
    if size + RECORD_OVERHEAD_BYTES > limit:
        raise RecordTooLarge(topic, size, limit)


@dataclass(frozen=True, slots=True)
class TopicState:
    """What ``ensure_topics`` found or did for one topic."""

    name: str
    partitions: int  # the partitions it has now
    wanted: int
    created: bool

    @property
    def too_few(self) -> bool:
        return self.partitions < self.wanted


async def ensure_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    timeout_s: float = 30.0,
    layout: TopicLayout | None = None,
) -> list[TopicState]:
    """Create the topics that do not exist yet, as ``layout`` says (services/common/topic_layout.py);
    waits for the broker up to ``timeout_s``. An existing topic with fewer partitions than
    ``partitions`` is logged as a warning: its consumer group never has more busy members."""
    layout = layout or TopicLayout()
    wanted = sorted(set(names))
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [n for n in wanted if n not in existing]
            if missing:
                try:
                    await admin.create_topics(
                        [
                            NewTopic(
                                n,
                                num_partitions=partitions,
                                replication_factor=layout.replication_factor,
                                topic_configs=layout.configs(n),
                            )
                            for n in missing
                        ]
                    )
                except TopicAlreadyExistsError:
                    pass  # another service created it first
            states = [TopicState(n, partitions, partitions, True) for n in missing]
            present = [n for n in wanted if n in existing]
            if present:
                counts = await _partition_counts(admin, present)
                states += [TopicState(n, counts.get(n, 0), partitions, False) for n in present]
            for state in states:
                if state.too_few:
                    log.warning(
                        "topic %s has %d partitions, fewer than the %d configured "
                        "(SWITCHBOARD_PARTITIONS): at most %d members of its consumer group "
                        "work. Raise it with kafka-topics.sh --alter --partitions %d (README "
                        "'Topics').",
                        state.name,
                        state.partitions,
                        state.wanted,
                        state.partitions,
                        state.wanted,
                    )
            return states
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
        finally:
            await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    return {
        t["topic"]: len(t["partitions"])
        for t in await admin.describe_topics(names)
        if t["error_code"] == 0
    }


async def topic_exists(bootstrap: str, name: str) -> bool:
    """Does the broker have topic ``name``? (A listing, which creates nothing, even on Tansu.)"""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        return name in await admin.list_topics()
    finally:
        await admin.close()


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The partitions of ``topic`` as the broker has them now (empty: no such topic).

    A group-less consumer's metadata keeps only the topics it is assigned: once it is assigned
    one, a metadata refresh forgets every other, ``partitions_for_topic`` answers None for them,
    and ``consumer.topics()`` fetches the full list without keeping it. So this asks the broker
    for every topic's metadata and reads the topic there (a listing creates nothing, even on the
    embedded broker, which creates a topic that a Metadata request names).
    """
    cluster = await consumer._client.fetch_all_metadata()
    return set(cluster.partitions_for_topic(topic) or ())


async def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        await admin.delete_topics(list(names))
    finally:
        await admin.close()


class Publisher(Protocol):
    """What handlers need from Kafka: send one message and know it was stored."""

    async def publish(
        self,
        topic: str,
        message: BaseModel,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None: ...


class BrokerPublisher:
    """``Publisher`` over a FastStream ``KafkaBroker``: waits for the broker's acknowledgement.

    With ``fences`` (embedded broker only), a publish waits while the keeper compacts its topic.
    """

    def __init__(
        self,
        broker: KafkaBroker,
        fences: Fences | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._broker = broker
        self._fences = fences
        self._limit = max_message_bytes

    async def publish(
        self,
        topic: str,
        message: BaseModel,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = message.model_dump_json().encode()
        check_size(topic, len(body), self._limit)

        def send() -> Awaitable[Any]:
            return self._broker.publish(
                body,
                topic=topic,
                key=key.encode() if key else None,
                headers={**JSON_HEADERS, **headers} if headers else JSON_HEADERS,
            )

        await _send_fenced(self._fences, topic, send)


async def _send_fenced(
    fences: Fences | None, topic: str, send: Callable[[], Awaitable[Any]]
) -> None:
    """``send`` one record to ``topic``, again past Tansu's UnknownError, once the keeper does
    not hold the topic (``fences``: embedded broker only)."""
    if fences is None:
        await resend_past_unknown_errors(send)
        return
    async with fences.writing((topic,)):
        await resend_past_unknown_errors(send)


class ProducerPublisher:
    """``Publisher`` straight on an aiokafka producer, without FastStream and without linger:
    for many small records that must each go out at once (a stream's chunks). One publish of a
    chunk cost 467 µs of CPU and 1.8 ms through ``BrokerPublisher`` (FastStream, linger 1 ms),
    231 µs and 0.4 ms here (``python -m bench.publish_cost``, docs/hot-path.md)."""

    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        fences: Fences | None = None,
        idempotent: bool = False,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=idempotent,
            linger_ms=0,
            max_request_size=max_message_bytes,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
        )
        self._fences = fences
        self._limit = max_message_bytes

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(
        self,
        topic: str,
        message: BaseModel,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = message.model_dump_json().encode()
        check_size(topic, len(body), self._limit)
        raw_headers = [(k, v.encode()) for k, v in {**JSON_HEADERS, **(headers or {})}.items()]

        def send() -> Awaitable[Any]:
            return self._producer.send_and_wait(
                topic, body, key=key.encode() if key else None, headers=raw_headers
            )

        await _send_fenced(self._fences, topic, send)


def make_broker(
    bootstrap: str,
    client_id: str,
    idempotent: bool = False,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> KafkaBroker:
    """FastStream's broker for one-at-a-time publishes. ``idempotent``: Kafka drops a record a
    producer retry sent twice (``CommonSettings.idempotent_producer``; the embedded broker has no
    idempotent producers). Either way duplicates from redelivery are absorbed downstream
    (outcome cache, insert de-duplication)."""
    return KafkaBroker(
        bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=idempotent,
        linger_ms=1,
        # aiokafka's default 16 KB batch holds a handful of results: under load, publishers
        # queued behind full batches (docs/hot-path.md)
        # a batch over the topics' max.message.bytes would be refused whole
        max_batch_size=min(BATCH_BYTES, max_message_bytes),
        max_request_size=max_message_bytes,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        logger=logging.getLogger(f"switchboard.kafka.{client_id}"),
        # FastStream logs "Received"/"Processed" per message at this level: two lines per
        # answered request at INFO, so they are kept for DEBUG
        log_level=logging.DEBUG,
    )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for ``BatchPublisher.publish_all``: already serialised."""

    topic: str
    value: bytes
    key: bytes | None = None


class BatchPublisher(Protocol):
    """Send many messages and return once the broker has stored every one of them."""

    async def publish_all(self, messages: Sequence[Outgoing]) -> None: ...


class KafkaBatchPublisher:
    """``BatchPublisher`` on an aiokafka producer: one record batch per partition per call.

    Appending to a record batch costs a fraction of aiokafka's per-message ``send()`` (which
    hashes the key in pure Python and keeps a future per message; docs/hot-path.md). Keys go to the
    partition Kafka's default partitioner picks, so a request id lands where the HTTP path
    (``BrokerPublisher``) would put it. A batch the broker refuses with UnknownError is built and
    sent again (``UNKNOWN_ERROR_RETRY_S``); any other failure raises: the caller retries the whole
    call, and the duplicates it may leave are absorbed downstream, like any at-least-once
    redelivery.
    """

    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        fences: Fences | None = None,
        idempotent: bool = False,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._bootstrap, self._client_id = bootstrap, client_id
        self._fences, self._idempotent = fences, idempotent
        self._limit = max_message_bytes
        self._producer: AIOKafkaProducer | None = None
        self._spread = itertools.count()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=self._idempotent,
            linger_ms=0,
            # a batch over the topics' max.message.bytes would be refused whole
            max_batch_size=min(BATCH_BYTES, self._limit),
            max_request_size=self._limit,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _targets(self, messages: Sequence[Outgoing]) -> list[int]:
        """The partition of each message: by key like Kafka's default, else spread evenly."""
        assert self._producer is not None, "start() first"
        out = [0] * len(messages)
        by_topic: dict[str, list[int]] = {}
        for i, message in enumerate(messages):
            by_topic.setdefault(message.topic, []).append(i)
        for topic, indexes in by_topic.items():
            partitions = sorted(await self._producer.partitions_for(topic))
            keyed = [i for i in indexes if messages[i].key is not None]
            chosen = partitions_for_keys([messages[i].key or b"" for i in keyed], len(partitions))
            for i, p in zip(keyed, chosen, strict=True):
                out[i] = partitions[p]
            for i in indexes:
                if messages[i].key is None:
                    out[i] = partitions[next(self._spread) % len(partitions)]
        return out

    async def publish_all(self, messages: Sequence[Outgoing]) -> None:
        if not messages:
            return
        for message in messages:
            check_size(message.topic, len(message.value) + len(message.key or b""), self._limit)
        if self._fences is None:
            await self._publish_all(messages)
            return
        async with self._fences.writing({m.topic for m in messages}):
            await self._publish_all(messages)

    async def _publish_all(self, messages: Sequence[Outgoing]) -> None:
        producer = self._producer
        assert producer is not None, "start() first"
        targets = await self._targets(messages)
        open_batches: dict[tuple[str, int], tuple[Any, list[Outgoing]]] = {}
        sent: list[Awaitable[None]] = []
        for message, partition in zip(messages, targets, strict=True):
            where = (message.topic, partition)
            entry = open_batches.get(where)
            if entry is None:
                entry = open_batches[where] = (producer.create_batch(), [])
            if _append(entry[0], message) is None:
                sent.append(await self._close_and_send(where, *entry))
                entry = open_batches[where] = (producer.create_batch(), [])
                _append(entry[0], message)
            entry[1].append(message)
        for where, entry in open_batches.items():
            sent.append(await self._close_and_send(where, *entry))
        await asyncio.gather(*sent)

    async def _close_and_send(
        self, where: tuple[str, int], batch: Any, members: list[Outgoing]
    ) -> Awaitable[None]:
        """Send ``batch`` (holding ``members``); what to await for it to be stored."""
        return self._stored(where, members, await self._send(where, batch))

    async def _send(self, where: tuple[str, int], batch: Any) -> Awaitable[Any]:
        assert self._producer is not None, "start() first"
        batch.close()
        return await self._producer.send_batch(batch, where[0], partition=where[1])

    async def _stored(
        self, where: tuple[str, int], members: list[Outgoing], future: Awaitable[Any]
    ) -> None:
        """Wait for a sent batch; one the broker failed with UnknownError is built and sent again."""
        try:
            await future
        except UnknownError:
            await resend_past_unknown_errors(lambda: self._send_again(where, members))

    async def _send_again(self, where: tuple[str, int], members: list[Outgoing]) -> None:
        assert self._producer is not None, "start() first"
        batch = self._producer.create_batch()
        for message in members:
            _append(batch, message)
        await (await self._send(where, batch))


def _append(batch: Any, message: Outgoing) -> Any:
    return batch.append(
        key=message.key, value=message.value, timestamp=None, headers=_JSON_HEADER_LIST
    )
