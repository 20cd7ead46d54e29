"""What every fault scenario reports, and the checks they share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psutil


@dataclass
class Tally:
    """A scenario's verdict: each count is of messages (or processes), and 0 is the pass mark.

    lost: sent and never handled (no result, no dead letter, not stored).
    duplicated: handled more than once where once was promised (a second dead letter, row or
    result for one message).
    stuck: a partition or consumer that stopped moving, or a caller left hanging.
    leaked: something that got out: a call let in without the key, another tenant's answer,
    or a process still running after the scenario stopped everything it started.
    """

    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    leaked: int = 0
    detail: str = ""

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck or self.leaked)

    def add(self, other: Tally) -> None:
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.stuck += other.stuck
        self.leaked += other.leaked

    def counts(self) -> str:
        return (
            f"lost={self.lost}, duplicated={self.duplicated}, stuck={self.stuck}, "
            f"leaked={self.leaked}"
        )


def leaked_processes(pids: Iterable[int]) -> int:
    """How many of ``pids`` (a scenario's processes) still run once it has stopped them."""
    alive = 0
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive += 1
        except psutil.NoSuchProcess:
            pass
    return alive
