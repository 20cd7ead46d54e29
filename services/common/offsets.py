"""Which offsets are safe to commit when records of a partition finish out of order.

Kafka commits a position, not a set: committing offset N says "everything before N is done".
With many calls in flight, record 7 may finish before record 5; the tracker only advances a
partition's commit point past records that finished, so a crash never skips work. Offsets a
partition never hands out (compacted away, transaction markers, a reset past a gap) are not
waited for: the point moves to the first record still in flight, or past the last one started.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class _Partition:
    order: deque[int] = field(default_factory=deque)  # started, in offset order, not yet passed
    pending: set[int] = field(default_factory=set)  # started, not finished
    after_last: int = 0  # one past the highest offset started

    def start(self, offset: int) -> None:
        self.pending.add(offset)
        if not self.order or offset > self.order[-1]:
            self.order.append(offset)
        elif offset not in self.order:  # read again from further back (a rewind)
            ordered = list(self.order)
            bisect.insort(ordered, offset)
            self.order = deque(ordered)
        self.after_last = max(self.after_last, offset + 1)

    def point(self) -> int:
        """The commit point: the first offset started and not finished, else past them all."""
        order = self.order
        while order and order[0] not in self.pending:
            order.popleft()
        return order[0] if order else self.after_last


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[Hashable, _Partition] = {}
        self._committed: dict[Hashable, int] = {}

    def started(self, partition: Hashable, offset: int) -> None:
        self._partitions.setdefault(partition, _Partition()).start(offset)

    def finished(self, partition: Hashable, offset: int) -> None:
        state = self._partitions.get(partition)
        if state is not None:  # else finished after its partition was revoked: not ours
            state.pending.discard(offset)

    def in_flight(self, partition: Hashable | None = None) -> int:
        if partition is not None:
            state = self._partitions.get(partition)
            return len(state.pending) if state else 0
        return sum(len(p.pending) for p in self._partitions.values())

    def to_commit(self) -> dict[Hashable, int]:
        """Commit points that moved since the last ``committed()`` call."""
        points = {p: state.point() for p, state in self._partitions.items()}
        return {p: n for p, n in points.items() if self._committed.get(p) != n}

    def committed(self, points: dict[Hashable, int]) -> None:
        self._committed.update(points)

    def forget(self, partition: Hashable) -> None:
        """Drop a partition this consumer no longer owns (after a rebalance)."""
        self._partitions.pop(partition, None)
        self._committed.pop(partition, None)
