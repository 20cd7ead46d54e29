"""The fetch loops keep polling while every slot is busy, with their partitions paused, so aiokafka
(which leaves the group when a member has not polled for ``max_poll_interval_ms``) keeps the member
in its group; and the group timeouts derived from the drain time and the longest call.

The loops run against a fake of aiokafka's consumer that keeps its rules: a new assignment starts
every partition unpaused, only assigned partitions can be paused, resumed or sought, and a paused
partition returns no records. tests/integration/test_scaling.py has the same on the real broker.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError

from services.common import consumer as consumers
from services.common import retry
from services.common.consumer import (
    BatchConsumer,
    ConcurrentConsumer,
    GroupTimeouts,
    _Pauses,
    group_timeouts,
)

TOPIC = "t.tier.x"
P0, P1, P2, P3 = (TopicPartition(TOPIC, p) for p in range(4))
MARGIN_MS = 300  # the tests' stand-in for MARGIN_MS: a max poll interval of 300 ms
BOUND_S = 10.0  # every wait of these tests


@pytest.mark.parametrize(
    ("session_ms", "drain_s", "longest_s", "expected"),
    [
        # no handler longer than the drain: the old rebalance timeout, and the same poll bound
        (6_000, 30.0, 0.0, GroupTimeouts(6_000, 1_000, 35_000, 35_000)),
        # a reasoning tier: 900 s calls keep the member however its loop waits
        (6_000, 30.0, 900.0, GroupTimeouts(6_000, 1_000, 35_000, 905_000)),
        # a call shorter than the drain: the drain decides
        (6_000, 30.0, 10.0, GroupTimeouts(6_000, 1_000, 35_000, 35_000)),
        # the session timeout is the floor of both; the heartbeat a sixth of it, 250 ms at least
        (60_000, 0.0, 0.0, GroupTimeouts(60_000, 10_000, 60_000, 60_000)),
        (1_000, 0.0, 0.0, GroupTimeouts(1_000, 250, 5_000, 5_000)),
        (3_000, 2.5, 0.5, GroupTimeouts(3_000, 500, 7_500, 7_500)),
    ],
)
def test_group_timeouts_follow_the_drain_and_the_longest_call(
    session_ms: int, drain_s: float, longest_s: float, expected: GroupTimeouts
) -> None:
    timeouts = group_timeouts(session_ms, drain_s, longest_s)
    assert timeouts == expected
    # a loop with every slot busy polls well within the bound
    assert timeouts.busy_poll_s * 3 == pytest.approx(timeouts.max_poll_interval_ms / 1000)


def record(tp: TopicPartition, offset: int) -> ConsumerRecord:
    value = f"{tp.partition}:{offset}".encode()
    return ConsumerRecord(
        tp.topic, tp.partition, offset, 0, 0, None, value, None, 0, len(value), ()
    )


class FakeKafka:
    """aiokafka's AIOKafkaConsumer as the fetch loops use it. Logs every poll: when, what was
    assigned and paused then, how many records it returned."""

    def __init__(self, ends: dict[TopicPartition, int]) -> None:
        self.ends = dict(ends)  # records 0 .. end-1 in each partition
        self.positions: dict[TopicPartition, int] = {}
        self.assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self.listener: Any = None
        self.polls: list[
            tuple[float, frozenset[TopicPartition], frozenset[TopicPartition], int]
        ] = []
        self.committed: dict[TopicPartition, int] = {}
        self.sought: list[tuple[TopicPartition, int]] = []
        self.assign_while_polling: set[TopicPartition] = set()
        self.pause_calls = 0

    # what the consumers call
    def subscribe(self, topics: Sequence[str], listener: Any) -> None:
        self.listener = listener

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def paused(self) -> set[TopicPartition]:
        return self._paused & self.assigned

    def _check(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            if tp not in self.assigned:
                raise IllegalStateError(f"No current assignment for partition {tp}")

    def pause(self, *tps: TopicPartition) -> None:
        self._check(tps)
        self.pause_calls += 1
        self._paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._check(tps)
        self._paused.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._check([tp])
        self.sought.append((tp, offset))
        self.positions[tp] = offset

    def highwater(self, tp: TopicPartition) -> int | None:
        return None  # nothing looks lost (LostPartitionCheck)

    async def commit(self, points: dict[TopicPartition, int]) -> None:
        self.committed.update(points)

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        if self.assign_while_polling:
            # a rebalance ending inside the poll: the new partitions come unpaused
            self.assigned |= self.assign_while_polling
            self.assign_while_polling = set()
        loop = asyncio.get_running_loop()
        budget = max_records or 1_000
        out: dict[TopicPartition, list[ConsumerRecord]] = {}
        for tp in sorted(self.assigned - self._paused):
            start = self.positions.get(tp, 0)
            take = min(self.ends.get(tp, 0) - start, budget)
            if take > 0:
                out[tp] = [record(tp, o) for o in range(start, start + take)]
                self.positions[tp] = start + take
                budget -= take
            if not budget:
                break
        self.polls.append(
            (loop.time(), frozenset(self.assigned), frozenset(self.paused()), len(out))
        )
        if not out and timeout_ms:
            await asyncio.sleep(min(timeout_ms, 20) / 1000)  # the broker's fetch wait, shortened
        return out

    # what the group does
    async def rebalance(self, tps: set[TopicPartition]) -> None:
        """Revoke everything, then assign ``tps``, each unpaused (aiokafka's eager protocol)."""
        await self.listener.on_partitions_revoked(sorted(self.assigned))
        self.assigned = set(tps)
        self._paused = set()
        self.positions = {tp: self.committed.get(tp, 0) for tp in tps}  # from the commit point
        await self.listener.on_partitions_assigned(set(tps))


async def until(check: Any, what: str) -> None:
    try:
        async with asyncio.timeout(BOUND_S):
            while True:
                if check():
                    return
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"waited {BOUND_S:g} s for {what}") from None


def polls_since(
    fake: FakeKafka, t0: float
) -> list[tuple[float, frozenset[Any], frozenset[Any], int]]:
    return [p for p in fake.polls if p[0] >= t0]


def max_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@pytest.fixture
def short_margin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A max poll interval of ``MARGIN_MS``; and a fetch loop that dies fails the test."""
    monkeypatch.setattr(consumers, "MARGIN_MS", MARGIN_MS)
    stopped: list[str] = []
    monkeypatch.setattr(retry, "stop_process", stopped.append)
    yield
    assert stopped == []


async def test_a_concurrent_consumer_with_every_slot_busy_polls_with_its_partitions_paused(
    monkeypatch: pytest.MonkeyPatch, short_margin: None
) -> None:
    fake = FakeKafka({P0: 6, P1: 6, P2: 3, P3: 1})
    monkeypatch.setattr(consumers, "_consumer", lambda *args: fake)
    release = asyncio.Event()
    handled: list[tuple[int, int]] = []

    async def handler(r: ConsumerRecord) -> None:
        await release.wait()
        handled.append((r.partition, r.offset))

    consumer = ConcurrentConsumer(
        bootstrap="unused",
        topics=[TOPIC],
        group_id="g",
        handler=handler,
        concurrency=2,
        fetch_max_wait_ms=20,
        client_id="c",
        drain_timeout_s=0.0,
        session_timeout_ms=100,
    )
    limit_s = consumer.timeouts.max_poll_interval_ms / 1000
    assert limit_s == pytest.approx(MARGIN_MS / 1000)
    await consumer.start()
    try:
        await fake.rebalance({P0, P1})
        await until(lambda: consumer.in_flight == 2, "both slots busy")
        busy_at = asyncio.get_running_loop().time()
        # busy for many times the max poll interval: polled all along, every partition paused
        await until(lambda: len(polls_since(fake, busy_at)) >= 8, "polls while busy")
        polls = polls_since(fake, busy_at)
        assert max_gap([busy_at] + [p[0] for p in polls]) < limit_s
        assert all(paused == assigned == {P0, P1} and n == 0 for _, assigned, paused, n in polls)

        # a rebalance while busy: P1 goes, P2 comes and is paused at once (it starts unpaused)
        await fake.rebalance({P0, P2})
        assert fake.paused() == {P0, P2}
        # a partition assigned inside a poll, before it could be paused: its record is put back
        fake.assign_while_polling = {P3}
        await until(lambda: (P3, 0) in fake.sought, "P3's record put back")
        await until(lambda: fake.paused() == {P0, P2, P3}, "P3 paused")
        assert consumer.in_flight == 2

        release.set()  # the slots free: every partition assigned now is read
        await until(
            lambda: (
                (fake.committed.get(P0), fake.committed.get(P2), fake.committed.get(P3))
                == (6, 3, 1)
            ),
            "P0, P2 and P3 read to their ends",
        )
    finally:
        release.set()
        await consumer.stop()
    # the two records in flight when P0 was revoked (the drain timeout is 0) are read again
    # from the commit point after the rebalance: at least once; every other record once
    counts = Counter(handled)
    assert set(counts) == {(0, o) for o in range(6)} | {(2, o) for o in range(3)} | {(3, 0)}
    assert {r for r, n in counts.items() if n > 1} == {(0, 0), (0, 1)}
    assert max(counts.values()) == 2


async def test_a_busy_worker_does_not_pause_while_slots_keep_freeing(
    monkeypatch: pytest.MonkeyPatch, short_margin: None
) -> None:
    """The hot path: slots that free within ``busy_poll_s`` are refilled from what was fetched,
    with no pause (a pause drops the prefetched records)."""
    fake = FakeKafka({P0: 200})
    monkeypatch.setattr(consumers, "_consumer", lambda *args: fake)

    async def handler(r: ConsumerRecord) -> None:
        await asyncio.sleep(0.001)

    consumer = ConcurrentConsumer(
        bootstrap="unused",
        topics=[TOPIC],
        group_id="g",
        handler=handler,
        concurrency=4,
        fetch_max_wait_ms=20,
        client_id="c",
        drain_timeout_s=0.0,
        session_timeout_ms=100,
    )
    await consumer.start()
    try:
        await fake.rebalance({P0})
        await until(lambda: fake.committed.get(P0) == 200, "all 200 committed")
    finally:
        await consumer.stop()
    assert fake.pause_calls == 0


async def test_a_batch_consumer_with_every_batch_slot_busy_polls_with_its_partitions_paused(
    monkeypatch: pytest.MonkeyPatch, short_margin: None
) -> None:
    fake = FakeKafka({P0: 4, P1: 4})
    monkeypatch.setattr(consumers, "_consumer", lambda *args: fake)
    release = asyncio.Event()
    batches: list[list[tuple[int, int]]] = []

    async def handler(records: Sequence[ConsumerRecord]) -> None:
        await release.wait()
        batches.append([(r.partition, r.offset) for r in records])

    consumer = BatchConsumer(
        bootstrap="unused",
        topics=[TOPIC],
        group_id="g",
        handler=handler,
        max_records=2,
        fetch_max_wait_ms=20,
        client_id="b",
        max_in_flight=1,
        drain_timeout_s=0.0,
        session_timeout_ms=100,
    )
    limit_s = consumer.timeouts.max_poll_interval_ms / 1000
    await consumer.start()
    try:
        await fake.rebalance({P0, P1})
        await until(lambda: fake.paused() == {P0, P1}, "paused while the one slot is busy")
        busy_at = asyncio.get_running_loop().time()
        await until(lambda: len(polls_since(fake, busy_at)) >= 6, "polls while busy")
        polls = polls_since(fake, busy_at)
        assert max_gap([busy_at] + [p[0] for p in polls]) < limit_s
        assert all(paused == assigned and n == 0 for _, assigned, paused, n in polls)
        await fake.rebalance({P1, P2})  # P2 arrives while busy: paused too
        assert fake.paused() == {P1, P2}
        release.set()
        await until(lambda: fake.committed.get(P1) == 4, "P1 read to its end")
    finally:
        release.set()
        await consumer.stop()
    seen = [r for batch in batches for r in batch]
    assert len(seen) == len(set(seen))
    assert {(1, o) for o in range(4)} <= set(seen)


@pytest.mark.parametrize(
    ("steps", "paused"),
    [
        ([("busy", True)], {P0, P1}),
        ([("busy", True), ("busy", False)], set()),
        # a listener's hold outlasts a busy stretch, and a busy stretch outlasts a hold
        ([("hold", {P1}), ("busy", True), ("busy", False)], {P1}),
        ([("busy", True), ("hold", {P1}), ("release", {P1})], {P0, P1}),
        ([("hold", {P1}), ("busy", True), ("release", {P1}), ("busy", False)], set()),
    ],
)
def test_pauses_keep_each_reason(steps: list[tuple[str, Any]], paused: set[TopicPartition]) -> None:
    fake = FakeKafka({})
    fake.assigned = {P0, P1}
    pauses = _Pauses(fake)  # type: ignore[arg-type]
    for step, arg in steps:
        getattr(pauses, step)(arg)
    assert fake.paused() == paused


def test_pauses_never_touch_a_partition_that_went() -> None:
    fake = FakeKafka({})
    fake.assigned = {P0, P1}
    pauses = _Pauses(fake)  # type: ignore[arg-type]
    pauses.hold({P1})
    pauses.busy(True)
    fake.assigned, fake._paused = {P0, P2}, set()  # a rebalance: P1 went (resume would raise)
    pauses.apply()
    assert fake.paused() == {P0, P2}
    pauses.release({P1})
    pauses.busy(False)
    assert fake.paused() == set()
