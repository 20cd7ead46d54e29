"""Kafka consumption with at-least-once delivery, built on aiokafka.

Two loops, both committing only what has been fully handled:

* ``ConcurrentConsumer`` runs up to ``concurrency`` handlers at once (model calls take seconds;
  one-at-a-time would cap a reasoning worker at a few requests per second) and commits each
  partition's contiguous finished prefix (``OffsetTracker``).
* ``BatchConsumer`` hands a batch to one handler (a ClickHouse insert, a batch publish) and
  commits after it, in batch order, with a few batches in flight.

A handler that raises is retried only when the error is transient (the broker or a store is
away: ``services/common/retry.py``), with capped backoff; skipping the record would lose it. Any
other error is the record's own: it goes to ``on_poison`` (which dead-letters it, and answers its
caller where there is one) and the partition moves on. A batch that fails so is split until the
record at fault is alone. On shutdown, in-flight work gets ``drain_timeout_s`` to finish; what does
not finish is not committed and is redelivered to the next owner. A fetch or commit loop that
dies stops the process (``retry.supervise``) rather than leave its partitions held and unread.
When every slot is busy, both loops pause their partitions and keep polling, so a member whose
handlers take minutes stays in its group (``group_timeouts`` says for how long it may not poll).
While they run, both report their partitions' lag (``telemetry.watch_lag``: the
switchboard_kafka_consumer_lag gauge, computed when ``/metrics`` is scraped).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from services.common import telemetry
from services.common.fences import is_filler
from services.common.kafka import MAX_MESSAGE_BYTES, METADATA_MAX_AGE_MS
from services.common.offsets import OffsetTracker
from services.common.retry import cancel_and_wait, describe_error, retry_transient, supervise
from services.common.tansu import LostPartitionCheck, log_ends

log = logging.getLogger(__name__)

RecordHandler = Callable[[ConsumerRecord], Awaitable[None]]
BatchHandler = Callable[[Sequence[ConsumerRecord]], Awaitable[None]]
# A record no handler can take, and why: dead-letter it (and answer its caller, if any).
PoisonHandler = Callable[[ConsumerRecord, Exception], Awaitable[None]]

SESSION_TIMEOUT_MS = 6_000  # the least a Kafka broker accepts by default
# What one fetch may bring back from all its partitions together
FETCH_MAX_BYTES = 64 * 1024 * 1024
# aiokafka retries a commit while Kafka is unreachable with no end: a stop waits this long for it
LAST_COMMIT_S = 10.0
# What a member's timeouts allow beyond the longest it may be busy: a commit, a round trip.
MARGIN_MS = 5_000
# While every slot is busy, the fetch loops poll this many times per max poll interval.
BUSY_POLLS = 3


@dataclass(frozen=True, slots=True)
class GroupTimeouts:
    """A consumer-group member's timeouts, in milliseconds (``group_timeouts``)."""

    session_ms: int
    heartbeat_ms: int
    rebalance_ms: int
    max_poll_interval_ms: int

    @property
    def busy_poll_s(self) -> float:
        """How long a fetch loop with every slot busy waits for one before it polls anyway."""
        return self.max_poll_interval_ms / 1000 / BUSY_POLLS


def group_timeouts(
    session_timeout_ms: int, drain_timeout_s: float, longest_call_s: float = 0.0
) -> GroupTimeouts:
    """How long a member may be silent, or away from its fetch loop, before it loses its place.

    - Session: a member that stops heartbeating (crashed) loses its partitions after this long.
      It heartbeats every sixth of it, so the living members notice a rebalance sooner.
    - Rebalance: how long the broker waits for the members to rejoin. A member first finishes
      the in-flight work of the partitions it gives up, for up to the drain timeout.
    - Max poll interval: aiokafka leaves the group when its fetch loop has not polled for this
      long (a client-side check, next to the heartbeat). The loops poll at least every
      ``busy_poll_s`` however long handlers take (they pause their partitions while every slot
      is busy), but a stop drains in-flight work, up to the drain timeout, without polling; the
      bound is above that, and above the longest a handler may take (``longest_call_s``: a
      worker's tier's request timeout), so a loop that did wait for a call keeps its place.
    """
    drain_ms = int(drain_timeout_s * 1000)
    longest_ms = max(drain_ms, int(longest_call_s * 1000))
    return GroupTimeouts(
        session_ms=session_timeout_ms,
        heartbeat_ms=max(250, session_timeout_ms // 6),
        rebalance_ms=max(session_timeout_ms, drain_ms + MARGIN_MS),
        max_poll_interval_ms=max(session_timeout_ms, longest_ms + MARGIN_MS),
    )


def _consumer(
    bootstrap: str,
    topics: Sequence[str],
    group_id: str,
    fetch_max_wait_ms: int,
    client_id: str,
    timeouts: GroupTimeouts,
    max_message_bytes: int,
) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        session_timeout_ms=timeouts.session_ms,
        heartbeat_interval_ms=timeouts.heartbeat_ms,
        rebalance_timeout_ms=timeouts.rebalance_ms,
        max_poll_interval_ms=timeouts.max_poll_interval_ms,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
        # the largest record fits in one partition's share of a fetch (SWITCHBOARD_MAX_MESSAGE_BYTES)
        max_partition_fetch_bytes=max_message_bytes,
        fetch_max_bytes=max(FETCH_MAX_BYTES, max_message_bytes),
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


def consumer_not_ready(consumer: ConcurrentConsumer | BatchConsumer, group: str) -> str | None:
    """Why a service's consumer cannot do its work yet (for ``GET /ready``), or None: its fetch
    loop stopped, or it has not joined ``group`` once (an assignment of no partitions counts)."""
    if not consumer.running:
        return "the consumer's fetch loop stopped (its error is in the log)"
    if not consumer.assigned.is_set():
        return f"joining consumer group {group}: no partition assignment received yet"
    return None


class CommitPoints:
    """Per assigned partition, where the group's commit point is known to be: the offset of the
    first record fetched since the partition came (a fetch starts at the commit point), then
    each commit of this member. What ``partition_lags`` subtracts from the highwater."""

    def __init__(self) -> None:
        self.points: dict[TopicPartition, int] = {}

    def fetched(self, tp: TopicPartition, records: Sequence[ConsumerRecord]) -> None:
        if records and tp not in self.points:
            self.points[tp] = records[0].offset

    def committed(self, points: Mapping[Any, int]) -> None:
        self.points.update(points)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.points.pop(tp, None)


def partition_lags(consumer: AIOKafkaConsumer, points: CommitPoints) -> list[tuple[str, int, int]]:
    """(topic, partition, lag) of each partition assigned to ``consumer`` whose lag is known:
    the highwater its last fetch saw, less the commit point (``points``; for a partition nothing
    was fetched from yet, the fetch position, which is where the group's commit point left it).
    A partition not fetched yet has no highwater and is left out. Runs on the event loop (a
    scrape), between the consumer's own steps: nothing changes under it.
    """
    lags = []
    for tp in consumer.assignment():
        try:
            high = consumer.highwater(tp)
        except AssertionError:  # no longer assigned
            continue
        done = points.points.get(tp)
        if done is None:
            done = _fetch_position(consumer, tp)
        if high is None or done is None:
            continue
        lags.append((tp.topic, tp.partition, max(high - done, 0)))
    return lags


def _fetch_position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The offset ``consumer`` fetches ``tp`` from next, or None while it is being reset.

    aiokafka's public ``position()`` is a coroutine that may wait for the reset; a scrape must
    not wait, so this reads the subscription state it keeps (private: this function is the only
    place that does, and it answers None if that state is not where it was in aiokafka 0.14).
    """
    try:
        state = consumer._subscription.subscription.assignment.state_value(tp)
        return int(state.position) if state is not None and state.has_valid_position else None
    except (AttributeError, AssertionError, KeyError, TypeError):
        return None


async def close_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, which also returns while Kafka is unreachable (every consumer we stop).

    aiokafka 0.14's fetcher cancels a fetch that waits to retry and then awaits it, so its stop
    raises CancelledError although nobody cancelled the caller; that is logged, not raised.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the caller is being cancelled
        log.warning("the Kafka consumer stopped with a fetch cut short (Kafka unreachable?)")


async def follow(
    consumer: AIOKafkaConsumer,
    handle: Callable[[ConsumerRecord], None],
    what: str,
    after_poll: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Hand every record a group-less reader fetches to ``handle``, for ever (cancel to stop).
    A failed fetch (the broker away) is logged and tried again: the consumer reconnects by
    itself. ``after_poll`` runs after every fetch, records or not."""
    while True:
        try:
            batches = await consumer.getmany(timeout_ms=1000)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("reading %s failed; trying again", what, exc_info=True)
            await asyncio.sleep(1)
            continue
        for records in batches.values():
            for record in records:
                handle(record)
        if after_poll is not None:
            await after_poll()


class _Pauses:
    """Which assigned partitions a consumer does not fetch from, and why: every one while all
    its slots are busy (``busy``), and those a rebalance listener holds until it is ready for
    them (``hold``). The one place that pauses and resumes, so that one reason ending does not
    resume a partition another still holds, and no resume reaches a partition that went.
    """

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._busy = False
        self._held: set[TopicPartition] = set()

    def busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self.apply()

    def hold(self, tps: Iterable[TopicPartition]) -> None:
        self._held.update(tps)
        self.apply()

    def release(self, tps: Iterable[TopicPartition]) -> None:
        self._held.difference_update(tps)
        self.apply()

    def apply(self) -> None:
        """Pause and resume the assigned partitions as the reasons say; also after every
        assignment, as aiokafka starts each partition of one unpaused, kept ones too."""
        assigned = self._consumer.assignment()
        stop = set(assigned) if self._busy else self._held & assigned
        paused = self._consumer.paused()  # assigned ones only
        if stop - paused:
            self._consumer.pause(*(stop - paused))
        if paused - stop:
            self._consumer.resume(*(paused - stop))


async def _poll_paused(consumer: AIOKafkaConsumer, pauses: _Pauses) -> None:
    """Poll with every assigned partition paused: no record comes, and aiokafka sees the member
    poll (it leaves the group after ``max_poll_interval_ms`` without one). A paused partition's
    prefetched records are dropped and fetched again after the resume."""
    pauses.busy(True)
    pauses.apply()  # a partition assigned since the last pause
    for tp, records in (await consumer.getmany(timeout_ms=0, max_records=1)).items():
        # assigned while the poll waited for a rebalance to end, before it could be paused:
        # put back, to be read when a slot is free
        consumer.seek(tp, records[0].offset)
    pauses.apply()


class _Poison:
    """Hands records no handler can take to ``on_poison``, and counts them."""

    def __init__(self, on_poison: PoisonHandler | None, stopping: asyncio.Event) -> None:
        self._on_poison, self._stopping = on_poison, stopping
        self.count = 0

    async def __call__(self, record: ConsumerRecord, exc: Exception) -> bool:
        """False only when shutdown began while the dead letter could not be written."""
        self.count += 1
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        log.error("%s cannot be handled (%s); dead-lettering it", where, describe_error(exc))
        if self._on_poison is None:
            log.error("%s: this consumer has no dead-letter topic; the record is skipped", where)
            return True
        handler = self._on_poison
        try:
            return await retry_transient(
                f"dead-lettering {where}", lambda: handler(record, exc), self._stopping
            )
        except Exception:
            log.exception("%s: writing its dead letter failed; the record is skipped", where)
            return True


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: ConcurrentConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.release(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner._pauses.apply()  # every slot may be busy
        self.owner.assigned.set()


class ConcurrentConsumer:
    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Sequence[str],
        group_id: str,
        handler: RecordHandler,
        concurrency: int,
        fetch_max_wait_ms: int,
        client_id: str,
        drain_timeout_s: float = 30.0,
        session_timeout_ms: int = SESSION_TIMEOUT_MS,
        on_poison: PoisonHandler | None = None,
        longest_call_s: float = 0.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        # ``longest_call_s``: the longest a handler call may take (group_timeouts)
        self.timeouts = group_timeouts(session_timeout_ms, drain_timeout_s, longest_call_s)
        self._consumer = _consumer(
            bootstrap,
            topics,
            group_id,
            fetch_max_wait_ms,
            client_id,
            self.timeouts,
            max_message_bytes,
        )
        self._pauses = _Pauses(self._consumer)
        self._topics = list(topics)
        self._handler = handler
        self._concurrency = concurrency
        self._drain_timeout_s = drain_timeout_s
        self._tracker = OffsetTracker()
        self._lost_partitions = LostPartitionCheck()
        self._tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._slot_free = asyncio.Event()
        self._finished = asyncio.Event()
        self._stopping = asyncio.Event()
        self._poison = _Poison(on_poison, self._stopping)
        self._loop_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._group = group_id
        self._points = CommitPoints()
        self.assigned = asyncio.Event()

    @property
    def poisoned(self) -> int:
        """Records handed to ``on_poison`` (dead-lettered) since the start."""
        return self._poison.count

    def lags(self) -> list[tuple[str, int, int]]:
        """``partition_lags`` of this consumer (switchboard_kafka_consumer_lag)."""
        return partition_lags(self._consumer, self._points)

    async def start(self) -> None:
        self._consumer.subscribe(self._topics, listener=_Rebalance(self))
        await self._consumer.start()
        telemetry.watch_lag(self._group, self)
        self._loop_task = asyncio.create_task(self._fetch_loop(), name="consume")
        self._commit_task = asyncio.create_task(self._commit_loop(), name="commit")
        supervise(self._loop_task, "the Kafka fetch loop", self._stopping)
        supervise(self._commit_task, "the Kafka commit loop", self._stopping)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def running(self) -> bool:
        """The fetch loop runs: started, and neither stopped nor ended by an error."""
        return self._loop_task is not None and not self._loop_task.done()

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            free = self._concurrency - len(self._tasks)
            if free <= 0:
                await self._wait_for_slot()
                continue
            self._pauses.busy(False)
            batches = await self._consumer.getmany(timeout_ms=200, max_records=free)
            for tp, records in batches.items():
                self._points.fetched(tp, records)
                for record in records:
                    self._tracker.started(tp, record.offset)
                    if is_filler(record):
                        self._tracker.finished(tp, record.offset)
                        self._finished.set()
                        continue
                    task = asyncio.create_task(self._process(tp, record))
                    self._tasks[task] = tp
            for tp in await self._lost_partitions(self._consumer):
                self._tracker.forget(tp)  # its offsets start again at the beginning
                self._points.forget([tp])

    async def _wait_for_slot(self) -> None:
        """Every slot is busy: wait for one, and when none frees within ``busy_poll_s``, poll
        with the partitions paused. Pausing at once would drop the prefetched records each
        time the slots fill, and a busy worker's slots fill after nearly every record."""
        self._slot_free.clear()
        try:
            async with asyncio.timeout(self.timeouts.busy_poll_s):
                await self._slot_free.wait()
        except TimeoutError:
            await _poll_paused(self._consumer, self._pauses)

    async def _process(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        what = f"handling {tp.topic}[{tp.partition}]@{record.offset}"
        try:
            try:
                done = await retry_transient(what, lambda: self._handler(record), self._stopping)
            except Exception as exc:
                done = await self._poison(record, exc)
        finally:
            self._tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._slot_free.set()
        if done:
            self._tracker.finished(tp, record.offset)
            self._finished.set()

    async def _commit_loop(self) -> None:
        while True:
            await self._finished.wait()
            self._finished.clear()
            await self._commit()
            await asyncio.sleep(0.02)  # coalesce completions into one commit request

    async def _commit(self) -> None:
        points = self._tracker.to_commit()
        if not points:
            return
        try:
            await self._consumer.commit(dict(points))  # type: ignore[arg-type]
            self._tracker.committed(points)
            self._points.committed(points)
        except Exception as exc:  # a rebalance in progress; the next commit carries it
            log.warning("commit failed (%s); will retry with the next completion", exc)
            self._finished.set()

    async def _drain(self, partitions: set[TopicPartition] | None) -> None:
        waiting = [t for t, tp in self._tasks.items() if partitions is None or tp in partitions]
        if waiting:
            await asyncio.wait(waiting, timeout=self._drain_timeout_s)

    async def release(self, revoked: list[TopicPartition]) -> None:
        """Partitions are being taken away: finish their work, commit it, forget them."""
        await self._drain(set(revoked))
        await self._commit()
        for tp in revoked:
            self._tracker.forget(tp)
        self._points.forget(revoked)

    async def stop(self) -> None:
        self._stopping.set()
        self._slot_free.set()
        if self._loop_task:
            await cancel_and_wait(self._loop_task)
        await self._drain(None)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._commit_task:
            await cancel_and_wait(self._commit_task)
        try:
            await asyncio.wait_for(self._commit(), LAST_COMMIT_S)
        except TimeoutError:
            log.warning(
                "the last commit did not finish in %.0f s (Kafka unreachable?); what was handled "
                "since the previous commit will be delivered again",
                LAST_COMMIT_S,
            )
        telemetry.forget_lag(self)
        await close_consumer(self._consumer)


class _BatchRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Drains the batches in progress before partitions go. When partitions come, and before any
    is read (they are paused meanwhile), tells ``on_assign`` which offsets of each a previous
    owner may have handled without committing: from the group's committed offset (the
    partition's start if none) to the partition's end. If those cannot be read within
    ``RANGES_TIMEOUT_S`` (Kafka unreachable), every offset from there on counts until the next
    assignment: slower, never short.
    """

    RANGES_TIMEOUT_S = 15.0
    NO_END = 2**63 - 1

    def __init__(self, owner: BatchConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.release()
        self.owner._points.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pauses = self.owner._pauses
        if self.owner.on_assign is not None:
            # aiokafka fetches for new partitions while this runs: none is read before on_assign
            pauses.hold(assigned)
            try:
                self.owner.on_assign(await self._unsettled(list(assigned)))
            finally:
                pauses.release(assigned)
        pauses.apply()  # every slot may be busy
        self.owner.assigned.set()

    async def _unsettled(self, assigned: list[TopicPartition]) -> dict[TopicPartition, range]:
        starts: dict[TopicPartition, int] = {}
        try:
            async with asyncio.timeout(self.RANGES_TIMEOUT_S):
                starts = await self._starts(assigned)
                ends = await self._ends(assigned)
        except Exception as exc:
            log.warning(
                "where the assigned partitions end is unknown (%r): every record of them "
                "counts as possibly handled and not committed until the next assignment",
                exc,
            )
            return {tp: range(starts.get(tp, 0), self.NO_END) for tp in assigned}
        return {tp: range(starts[tp], ends[tp]) for tp in assigned}

    async def _starts(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        consumer = self.owner._consumer
        committed = dict(zip(tps, await asyncio.gather(*map(consumer.committed, tps)), strict=True))
        fresh = [tp for tp, offset in committed.items() if offset is None]
        first = await consumer.beginning_offsets(fresh) if fresh else {}
        return {tp: first[tp] if at is None else at for tp, at in committed.items()}

    async def _ends(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        if not tps:
            return {}
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.owner._bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
        )
        try:
            await reader.start()
            # a fetch's high watermark (log_ends), as Tansu's ListOffsets stops at its last batch
            return await log_ends(reader, tps, timeout_s=self.RANGES_TIMEOUT_S)
        finally:
            await close_consumer(reader)


@dataclass
class _Batch:
    task: asyncio.Task[bool]  # the handler, retried until done; False if shutdown cut it short
    points: dict[TopicPartition, int]  # what to commit once it is done


class BatchConsumer:
    """Hands up to ``max_records`` records at a time to one handler; commits after it succeeds.

    Up to ``max_in_flight`` batches are handled at once, so the next batch is fetched and worked
    on while the previous one waits for the broker's or the store's acknowledgement (one at a
    time, the event loop sits idle while it waits: docs/hot-path.md). Commits still
    follow batch order: a batch is committed only when it and every batch before it are done.

    With ``linger_ms`` a batch collects what arrives over that long (up to ``max_records``)
    before it is handed out, so a trickle of records still makes few, large handler calls.

    On a rebalance the batches in progress are finished and committed before the partitions go
    (``drain_timeout_s`` at most); a commit refused because they went anyway is dropped, and the
    new owner redelivers those records.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Sequence[str],
        group_id: str,
        handler: BatchHandler,
        max_records: int,
        fetch_max_wait_ms: int,
        client_id: str,
        max_in_flight: int = 1,
        drain_timeout_s: float = 30.0,
        linger_ms: int = 0,
        session_timeout_ms: int = SESSION_TIMEOUT_MS,
        on_assign: Callable[[dict[TopicPartition, range]], None] | None = None,
        on_poison: PoisonHandler | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        # called when partitions are assigned, before any is read, with the offsets of each that
        # a previous owner may have handled and not committed (_BatchRebalance)
        self.on_assign = on_assign
        self._bootstrap = bootstrap  # where _BatchRebalance reads the partitions' ends
        self.timeouts = group_timeouts(session_timeout_ms, drain_timeout_s)
        self._consumer = _consumer(
            bootstrap,
            topics,
            group_id,
            fetch_max_wait_ms,
            client_id,
            self.timeouts,
            max_message_bytes,
        )
        self._pauses = _Pauses(self._consumer)
        self._topics = list(topics)
        self._handler = handler
        self._max_records = max_records
        self._linger_s = linger_ms / 1000
        self._flush = asyncio.Event()  # a rebalance began: hand out what has been gathered
        self._gathering = False  # records fetched, not yet handed to the handler
        self._drain_timeout_s = drain_timeout_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._batches: deque[_Batch] = deque()
        self._lost_partitions = LostPartitionCheck()
        self._queued = asyncio.Event()
        self._idle = asyncio.Event()  # nothing handled and not yet committed
        self._idle.set()
        self._stopping = asyncio.Event()
        self._poison = _Poison(on_poison, self._stopping)
        self._fetch_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._group = group_id
        self._points = CommitPoints()
        self.assigned = asyncio.Event()

    @property
    def poisoned(self) -> int:
        """Records handed to ``on_poison`` (dead-lettered) since the start."""
        return self._poison.count

    def lags(self) -> list[tuple[str, int, int]]:
        """``partition_lags`` of this consumer (switchboard_kafka_consumer_lag)."""
        return partition_lags(self._consumer, self._points)

    async def start(self) -> None:
        self._consumer.subscribe(self._topics, listener=_BatchRebalance(self))
        await self._consumer.start()
        telemetry.watch_lag(self._group, self)
        self._fetch_task = asyncio.create_task(self._fetch_loop(), name="consume-batch")
        self._commit_task = asyncio.create_task(self._commit_loop(), name="commit-batch")
        supervise(self._fetch_task, "the Kafka fetch loop", self._stopping)
        supervise(self._commit_task, "the Kafka commit loop", self._stopping)

    @property
    def running(self) -> bool:
        """The fetch loop runs: started, and neither stopped nor ended by an error."""
        return self._fetch_task is not None and not self._fetch_task.done()

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            self._points.forget(await self._lost_partitions(self._consumer))
            await self._take_slot()
            self._pauses.busy(False)
            try:
                records, points = await self._gather()
            except BaseException:
                self._slots.release()
                raise
            if not records:
                self._slots.release()
                continue
            self._batches.append(_Batch(asyncio.create_task(self._handle(records)), points))
            self._gathering = False
            self._queued.set()

    async def _take_slot(self) -> None:
        """A batch slot; while every one is busy, a poll with the partitions paused every
        ``busy_poll_s`` (``ConcurrentConsumer._wait_for_slot``)."""
        while True:
            try:
                async with asyncio.timeout(self.timeouts.busy_poll_s):
                    await self._slots.acquire()
                return
            except TimeoutError:
                await _poll_paused(self._consumer, self._pauses)

    async def _gather(self) -> tuple[list[ConsumerRecord], dict[TopicPartition, int]]:
        """One batch: what one poll returns, or with ``linger_ms``, what arrives until then.

        Lingering turns many small polls into one handler call (one ClickHouse insert instead
        of dozens); it ends early at ``max_records``, on shutdown, and on a rebalance, so a
        partition is never given up with records of it still waiting here.
        """
        records: list[ConsumerRecord] = []
        points: dict[TopicPartition, int] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger_s
        self._flush.clear()
        while True:
            left_ms = max(int((deadline - loop.time()) * 1000), 0) if records else 200
            batches = await self._consumer.getmany(
                timeout_ms=min(left_ms, 200), max_records=self._max_records - len(records)
            )
            for tp, recs in batches.items():
                self._points.fetched(tp, recs)
                if recs:
                    records.extend(r for r in recs if not is_filler(r))
                    points[tp] = recs[-1].offset + 1
            if records:
                self._gathering = True
                self._idle.clear()  # a rebalance now waits for this batch to be committed
            if (
                not records
                or len(records) >= self._max_records
                or loop.time() >= deadline
                or self._flush.is_set()
                or self._stopping.is_set()
            ):
                return records, points

    async def _handle(self, records: list[ConsumerRecord]) -> bool:
        try:
            return await self._handle_or_split(records)
        finally:
            self._slots.release()

    async def _handle_or_split(self, records: list[ConsumerRecord]) -> bool:
        """The handler on ``records``; if it fails for a reason that is not transient, on each
        half, down to the record at fault, which goes to ``on_poison``. The rest are handled."""
        try:
            return await retry_transient(
                f"handling a batch of {len(records)}",
                lambda: self._handler(records),
                self._stopping,
            )
        except Exception as exc:
            if len(records) == 1:
                return await self._poison(records[0], exc)
            log.warning(
                "a batch of %d failed (%s); handling it in halves to find the record at fault",
                len(records),
                describe_error(exc),
            )
        middle = len(records) // 2
        return await self._handle_or_split(records[:middle]) and await self._handle_or_split(
            records[middle:]
        )

    async def _commit_loop(self) -> None:
        while True:
            if not self._batches:
                if not self._gathering:
                    self._idle.set()
                self._queued.clear()
                await self._queued.wait()
                continue
            head = self._batches[0].task
            await asyncio.wait([head])
            if head.cancelled() or not head.result():
                return  # shutting down with this batch unfinished: nothing after it is committed
            points: dict[TopicPartition, int] = {}
            while self._batches:  # every finished batch at the head, in one commit
                task = self._batches[0].task
                if not task.done() or task.cancelled() or not task.result():
                    break
                points.update(self._batches.popleft().points)
            await self._commit(points)

    async def _commit(self, points: dict[TopicPartition, int]) -> None:
        async def commit() -> None:
            try:
                await self._consumer.commit(points)
            except (CommitFailedError, IllegalStateError) as exc:
                log.warning("batch not committed, its partitions moved (%s); redelivered", exc)
            else:
                self._points.committed(points)

        try:
            await retry_transient("committing", commit, self._stopping)
        except Exception as exc:  # the next batch's commit carries these points too
            log.warning("commit failed (%s); the next commit carries it", describe_error(exc))

    async def _drained(self) -> None:
        """Every batch handed out is committed, or committing stopped for shutdown."""
        if self._commit_task is None:  # not started: the first join revokes nothing
            return
        idle = asyncio.ensure_future(self._idle.wait())
        try:
            await asyncio.wait(
                [idle, self._commit_task],
                timeout=self._drain_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            idle.cancel()

    async def release(self) -> None:
        """Partitions are being taken away: let the batches in progress finish and commit."""
        self._flush.set()
        await self._drained()

    async def stop(self) -> None:
        self._stopping.set()
        if self._fetch_task:
            # records fetched but not handed out are redelivered
            await cancel_and_wait(self._fetch_task)
            self._gathering = False  # records gathered but not handed out are redelivered
            if not self._batches:
                self._idle.set()
        if self._commit_task:
            await self._drained()
            for batch in self._batches:
                batch.task.cancel()
            if self._batches:
                await asyncio.wait([b.task for b in self._batches])
            await cancel_and_wait(self._commit_task)
        telemetry.forget_lag(self)
        await close_consumer(self._consumer)
