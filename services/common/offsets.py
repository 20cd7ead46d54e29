"""Which offsets are safe to commit when records of a partition finish out of order.

Kafka commits a position, not a set: committing offset N says "everything before N is done".
With many calls in flight, record 7 may finish before record 5; the tracker only advances a
partition's commit point over a contiguous run of finished records, so a crash never skips work.
"""

from __future__ import annotations

from collections.abc import Hashable


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[Hashable, set[int]] = {}
        self._done: dict[Hashable, set[int]] = {}
        self._next: dict[Hashable, int] = {}  # commit point: first offset not known to be done
        self._committed: dict[Hashable, int] = {}

    def started(self, partition: Hashable, offset: int) -> None:
        self._pending.setdefault(partition, set()).add(offset)
        self._done.setdefault(partition, set())
        if partition not in self._next or offset < self._next[partition]:
            self._next[partition] = offset

    def finished(self, partition: Hashable, offset: int) -> None:
        pending = self._pending.get(partition)
        if pending is None or offset not in pending:
            return  # finished after its partition was revoked or started again: not ours
        pending.discard(offset)
        self._done[partition].add(offset)
        nxt = self._next[partition]
        done = self._done[partition]
        while nxt in done:
            done.discard(nxt)
            nxt += 1
        self._next[partition] = nxt

    def in_flight(self, partition: Hashable | None = None) -> int:
        if partition is not None:
            return len(self._pending.get(partition, ()))
        return sum(len(p) for p in self._pending.values())

    def to_commit(self) -> dict[Hashable, int]:
        """Commit points that moved since the last ``committed()`` call."""
        return {p: n for p, n in self._next.items() if self._committed.get(p) != n}

    def committed(self, points: dict[Hashable, int]) -> None:
        self._committed.update(points)

    def forget(self, partition: Hashable) -> None:
        """Drop a partition this consumer no longer owns (after a rebalance)."""
        for table in (self._pending, self._done, self._next, self._committed):
            table.pop(partition, None)
