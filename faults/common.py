"""What every fault scenario reports, and the checks they share."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer


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


async def count_by(
    bootstrap: str,
    topic: str,
    by: str | Callable[[Any], str],
    expect: Collection[str] = (),
    wait_s: float = 180.0,
    at_least: int = 0,
    quiet_polls: int = 3,
) -> Counter[str]:
    """Records of ``topic`` (JSON) counted by their ``by`` field (or what ``by`` returns for one),
    read from the start: until every value in ``expect`` and ``at_least`` distinct values have
    been seen (or ``wait_s`` passed), then on until the topic has been quiet for ``quiet_polls``
    polls, so late repeats are counted too."""
    key = (lambda message: message[by]) if isinstance(by, str) else by
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=50
    )
    await consumer.start()
    seen: Counter[str] = Counter()
    missing = set(expect)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        quiet = 0
        while loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            for records in batches.values():
                for record in records:
                    value = key(json.loads(record.value))
                    seen[value] += 1
                    missing.discard(value)
            enough = not missing and len(seen) >= at_least
            quiet = quiet + 1 if not batches and enough else 0
            if enough and quiet >= quiet_polls:
                break
    finally:
        await consumer.stop()
    return seen


_CHDB_DUMP = """
import sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
for row in client.query(sys.argv[2]).result_rows:
    print("\\t".join(map(str, row)))
"""


def chdb_rows(chdb_dir: Path, sql: str) -> list[str]:
    """The rows of ``sql`` on the chDB directory ``chdb_dir``, tab-separated, one per line.

    In a process of its own: chDB opens one directory per process, and only one process at a
    time may hold a directory (the metrics writer must have stopped)."""
    done = subprocess.run(
        [sys.executable, "-c", _CHDB_DUMP, str(chdb_dir), sql],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout.splitlines()
