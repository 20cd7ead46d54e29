"""The embedded broker's keeper: keeps every partition small, and says so when it cannot.

Tansu (the embedded broker) keeps every record batch it is given, and a fetch from a partition
costs time in proportion to the batches it holds: 2.4 ms at 2,500, 11.7 ms at 10,000, and from
about 12,500 no answer at all (docs/embedded-broker.md). Kafka's retention never lets that happen;
Tansu has none, and no DeleteRecords. So ``switchboard up`` runs a keeper, which every
``PROBE_S``:

* reads the end of every partition of the stack's topics, timing the fetch, and warns, naming the
  topic, when that fetch is slow;
* compacts a topic once a partition took ``COMPACT_AFTER`` records since its last compaction:
  the publishers of every service hold their writes to it (services/common/fences.py), the keeper
  reads what some consumer group has not committed yet, deletes the topic, creates it again and
  writes those records back at their own offsets behind one filler record. Offsets never move, so
  consumers carry on where they were and see nothing of it; a hold lasts tens of milliseconds;
* writes what it saw to ``<run dir>/keeper.json`` (read by ``make soak``).

What is compacted: only records every consumer group reading the topic has committed. A topic
no group reads (nothing committed on it) is kept whole; a warning says so once it grows. Reply
topics are the router's own (services/router/replies.py). Topics that producers outside the stack
write to (the ingress) cannot be held: they are compacted only when nothing was written to them
for a whole probe interval and while the keeper works, and a record that lands in the
milliseconds between its last look and the delete is lost. docs/embedded-broker.md has the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import Topics
from services.common.fences import FILLER_HEADER, HELD, HOLD, MEMBER, fence_dir, write_file
from services.common.kafka import MAX_MESSAGE_BYTES, delete_topics, ensure_topics
from services.common.tansu import log_ends

log = logging.getLogger("switchboard.keeper")

PROBE_S = 2.0
COMPACT_AFTER = 2_000  # records a partition takes before its topic is compacted
SLOW_FETCH_MS = 250.0  # a partition's last batch taking longer than this to fetch is a warning
WARN_BATCHES = 5_000  # a partition holding more batches than this, compacted or not, is a warning
HOLD_ACK_S = 5.0  # how long every publishing process has to hold its writes
MAX_TAIL = 50_000  # unconsumed records written back at most; more is left for a later probe
_BATCH_BYTES = 4 * 1024 * 1024


class NotNow(Exception):
    """A compaction that cannot happen now; the next probe tries again."""


@dataclass
class PartitionState:
    base: int = 0  # the partition's end at its last compaction
    written_back: int = 0  # record batches that compaction wrote

    def batches_at_most(self, end: int) -> int:
        return max(end - self.base, 0) + self.written_back


@dataclass
class TopicState:
    partitions: dict[int, PartitionState] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)
    compactions: int = 0
    tail_fetch_ms: float | None = None
    warned: str = ""

    def batches(self) -> dict[int, int]:
        return {
            p: self.partitions.setdefault(p, PartitionState()).batches_at_most(end)
            for p, end in self.ends.items()
        }


class Keeper:
    def __init__(self, bootstrap: str, topics: Topics, run_dir: Path, partitions: int = 4) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._run_dir = run_dir
        self._partitions = partitions
        self._external = {topics.ingress}  # written by producers outside the stack
        self.state: dict[str, TopicState] = {}
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap)
        await self._admin.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=10,
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
        )
        await self._consumer.start()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            acks="all",
            linger_ms=0,
            max_batch_size=_BATCH_BYTES,
            max_request_size=MAX_MESSAGE_BYTES,
        )
        await self._producer.start()
        fence_dir(self._run_dir).mkdir(parents=True, exist_ok=True)

    async def stop(self) -> None:
        for part in (self._producer, self._consumer, self._admin):
            if part is not None:
                with contextlib.suppress(Exception):
                    await (part.close() if isinstance(part, AIOKafkaAdminClient) else part.stop())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.probe()
            except Exception:
                log.exception("keeper: probe failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROBE_S)

    # --- one probe ----------------------------------------------------------------------------

    async def probe(self) -> None:
        assert self._admin is not None
        names = sorted(
            t for t in await self._admin.list_topics() if t.startswith(f"{self._topics.prefix}.")
        )
        for gone in set(self.state) - set(names):
            del self.state[gone]
        for topic in names:
            await self._look(topic)
        self._write_state()

    async def _look(self, topic: str) -> None:
        state = self.state.setdefault(topic, TopicState())
        before = dict(state.ends)
        tps = await self._partitions_of(topic)
        if not tps:
            return
        started = time.perf_counter()
        try:
            ends = await self._ends(tps)
        except TimeoutError:
            state.tail_fetch_ms = None
            self._warn(state, topic, f"the broker did not answer a fetch from {topic} in 5 s")
            return
        state.tail_fetch_ms = (time.perf_counter() - started) * 1000 / len(tps)
        state.ends = {tp.partition: end for tp, end in ends.items()}
        batches = state.batches()
        if state.tail_fetch_ms > SLOW_FETCH_MS:
            self._warn(
                state,
                topic,
                f"fetches from {topic} take {state.tail_fetch_ms:.0f} ms a partition (up to "
                f"{max(batches.values())} record batches in one); the embedded broker slows "
                "down as partitions fill",
            )
        if self._topics.is_reply_topic(topic) and topic != self._topics.results:
            return  # the router rotates its reply topics itself
        written = {p: state.partitions[p].base for p in state.ends}
        if max(state.ends[p] - written[p] for p in state.ends) < COMPACT_AFTER:
            return
        if topic in self._external and state.ends != before:
            return  # written to by producers we cannot hold: wait for a quiet probe
        try:
            await self._compact(topic, tps, state)
        except NotNow as exc:
            if max(batches.values()) > WARN_BATCHES:
                self._warn(
                    state,
                    topic,
                    f"{topic} holds up to {max(batches.values())} batches "
                    f"a partition and cannot be compacted: {exc}",
                )
            else:
                log.info("keeper: %s not compacted now: %s", topic, exc)

    def _warn(self, state: TopicState, topic: str, message: str) -> None:
        if state.warned != message:
            log.warning("keeper: %s", message)
        state.warned = message

    async def _partitions_of(self, topic: str) -> list[TopicPartition]:
        assert self._admin is not None
        described = await self._admin.describe_topics([topic])
        partitions = [p["partition"] for d in described for p in d.get("partitions", [])]
        return [TopicPartition(topic, p) for p in sorted(partitions)]

    async def _ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        assert self._consumer is not None
        return await log_ends(self._consumer, tps, timeout_s=5.0)

    async def _committed(self, tps: Sequence[TopicPartition]) -> dict[str, dict[int, int]]:
        """What each consumer group that reads these partitions has committed on them."""
        assert self._admin is not None
        out = {}
        for group, _ in await self._admin.list_consumer_groups():
            offsets = await self._admin.list_consumer_group_offsets(group, partitions=list(tps))
            committed = {tp.partition: o.offset for tp, o in offsets.items() if o.offset >= 0}
            if committed:
                out[group] = committed
        return out

    # --- compaction ---------------------------------------------------------------------------

    async def _compact(self, topic: str, tps: list[TopicPartition], state: TopicState) -> None:
        seen = dict(state.ends)
        if not await self._committed(tps):
            raise NotNow("no consumer group has committed anything on it")
        started = time.perf_counter()
        async with self._hold(topic):
            ends = await self._ends(tps)
            if topic in self._external and {tp.partition: e for tp, e in ends.items()} != seen:
                raise NotNow("written to while the keeper looked")
            readers = await self._committed(tps)
            if not readers:
                raise NotNow("no consumer group has committed anything on it")
            keep = {
                tp: min(min(c.get(tp.partition, 0) for c in readers.values()), ends[tp])
                for tp in tps
            }
            if sum(ends[tp] - keep[tp] for tp in tps) > MAX_TAIL:
                raise NotNow(f"its consumers are more than {MAX_TAIL} records behind")
            tails = await self._read(keep, ends)
            if topic in self._external and await self._ends(tps) != ends:
                raise NotNow("written to while the keeper read it")
            await self._recreate(topic, len(tps))
            for tp in tps:
                written = await self._write_back(tp, tails[tp], ends[tp])
                state.partitions[tp.partition] = PartitionState(ends[tp], written)
        state.compactions += 1
        log.info(
            "keeper: compacted %s in %.0f ms: %d unconsumed records written back",
            topic,
            (time.perf_counter() - started) * 1000,
            sum(len(t) for t in tails.values()),
        )

    async def _recreate(self, topic: str, partitions: int) -> None:
        """Delete ``topic`` and create it with ``partitions`` partitions. A client asking about
        it in between makes Tansu create it with its default of 4: then once more."""
        for _ in range(3):
            await delete_topics(self._bootstrap, [topic])
            await ensure_topics(self._bootstrap, [topic], partitions, timeout_s=10.0)
            if len(await self._partitions_of(topic)) == partitions:
                return
        log.error("keeper: %s keeps coming back without %d partitions", topic, partitions)

    @asynccontextmanager
    async def _hold(self, topic: str) -> AsyncIterator[None]:
        """Every publishing process holds its writes to ``topic`` inside this block."""
        folder = fence_dir(self._run_dir)
        token = uuid.uuid4().hex
        hold = folder / f"{topic}{HOLD}"
        write_file(hold, token)
        try:
            deadline = time.monotonic() + HOLD_ACK_S
            while missing := [m for m in _members(folder) if not _held(folder, topic, m, token)]:
                if time.monotonic() > deadline:
                    raise NotNow(f"{', '.join(missing)} did not hold writes in {HOLD_ACK_S:g} s")
                await asyncio.sleep(0.005)  # a poll of files the members write
            yield
        finally:
            hold.unlink(missing_ok=True)

    async def _read(
        self, keep: dict[TopicPartition, int], ends: dict[TopicPartition, int]
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """The records from ``keep`` to ``ends`` of each partition."""
        consumer = self._consumer
        assert consumer is not None
        tails: dict[TopicPartition, list[ConsumerRecord]] = {tp: [] for tp in keep}
        wanted = [tp for tp in keep if keep[tp] < ends[tp]]
        if not wanted:
            return tails
        consumer.assign(wanted)
        for tp in wanted:
            consumer.seek(tp, keep[tp])
        deadline = time.monotonic() + 10.0
        while any(
            (tails[tp][-1].offset + 1 if tails[tp] else keep[tp]) < ends[tp] for tp in wanted
        ):
            if time.monotonic() > deadline:
                raise NotNow("could not read its unconsumed records in 10 s")
            for tp, records in (await consumer.getmany(*wanted, timeout_ms=500)).items():
                tails[tp].extend(r for r in records if r.offset < ends[tp])
        return tails

    async def _write_back(self, tp: TopicPartition, records: list[ConsumerRecord], end: int) -> int:
        """Write ``records`` at their offsets behind one filler; the partition ends at ``end``.
        Returns the record batches written."""
        producer = self._producer
        assert producer is not None
        if end == 0:
            return 0
        first = records[0].offset if records else end
        entries: list[tuple[int, Any, Any, Any, list[tuple[str, bytes]]]] = []
        if first > 0:
            entries.append((first - 1, None, None, b"", [(FILLER_HEADER, b"1")]))
        entries += [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in records]
        batches, base, batch = 0, 0, producer.create_batch()
        for offset, timestamp, key, value, headers in entries:
            batch._relative_offset = offset - base
            if batch.append(timestamp=timestamp, key=key, value=value, headers=headers) is None:
                await self._send(tp, batch, base)
                batches += 1
                base, batch = offset, producer.create_batch()
                batch._relative_offset = 0
                batch.append(timestamp=timestamp, key=key, value=value, headers=headers)
        await self._send(tp, batch, base)
        return batches + 1

    async def _send(self, tp: TopicPartition, batch: Any, base: int) -> None:
        assert self._producer is not None
        batch.close()
        stored = await (await self._producer.send_batch(batch, tp.topic, partition=tp.partition))
        if stored.offset != base:
            log.error(
                "keeper: %s[%d] stored a batch at offset %d, not %d: something wrote to it "
                "while it was compacted; its readers may skip or repeat records",
                tp.topic,
                tp.partition,
                stored.offset,
                base,
            )

    # --- state file ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "ts": time.time(),
            "topics": {
                topic: {
                    "partitions": {
                        str(p): {"end": s.ends[p], "batches_at_most": b}
                        for p, b in s.batches().items()
                    },
                    "compactions": s.compactions,
                    "tail_fetch_ms": s.tail_fetch_ms,
                }
                for topic, s in self.state.items()
            },
        }

    def _write_state(self) -> None:
        write_file(self._run_dir / "keeper.json", json.dumps(self.snapshot(), indent=1))


def _members(folder: Path) -> list[str]:
    """The processes that publish and are alive."""
    out = []
    for path in folder.glob(f"*{MEMBER}"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(path.read_text())
            os.kill(pid, 0)
            out.append(path.name[: -len(MEMBER)])
    return out


def _held(folder: Path, topic: str, member: str, token: str) -> bool:
    try:
        return (folder / f"{topic}.{member}{HELD}").read_text() == token
    except OSError:
        return False


class KeeperThread:
    """The keeper on its own event loop in a thread of ``switchboard up``'s supervisor."""

    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="keeper", daemon=True)
        self._started = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(30)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.keeper.start()
        finally:
            self._started.set()
        try:
            await self.keeper.run(self._stop)
        finally:
            await self.keeper.stop()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
