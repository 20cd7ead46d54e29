"""Holds on writing to a topic while the embedded broker's keeper compacts it, and the filler
records compaction leaves behind.

Only for the embedded broker (Tansu), which keeps every record batch and slows down as a partition
fills; the keeper of ``switchboard up`` (switchboard/keeper.py) rewrites a topic into a few batches, and no
record may be written to it meanwhile. On Kafka, retention does this and nothing here runs.

The keeper and the services talk through files in ``<run dir>/fences/``:

* each process that publishes registers as ``<member>.member`` (its pid inside) while it runs;
* the keeper asks for a hold with ``<topic>.hold`` (a token inside);
* each member stops new publishes to that topic, waits for those under way, and answers with
  ``<topic>.<member>.held`` (the token inside);
* the keeper removes the hold file when it is done, and the waiting publishes go on.

A file poll every ``POLL_S`` costs a directory listing; a hold lasts tens of milliseconds.

Compaction keeps every offset: the records nobody has consumed yet are written back where they
were, behind one empty *filler* record (header ``switchboard-filler``) that takes the offsets of
the records dropped. Readers' positions stay valid; a reader that starts from the beginning meets
the filler, and every consumer here skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.02
FILLER_HEADER = "switchboard-filler"
HOLD = ".hold"
HELD = ".held"
MEMBER = ".member"


def is_filler(record: Any) -> bool:
    """A record the keeper wrote in place of compacted ones (aiokafka ConsumerRecord)."""
    return not record.value and any(k == FILLER_HEADER for k, _ in record.headers or ())


def for_process(run_dir: Path | None, embedded_broker: bool, name: str) -> Fences | None:
    """This process's fences on the embedded broker (its settings say so), else None."""
    if not embedded_broker or run_dir is None:
        return None
    return Fences(run_dir, f"{name}-{secrets.token_hex(3)}")


def fence_dir(run_dir: Path) -> Path:
    return run_dir / "fences"


def write_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole: a reader never sees it half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Fences:
    """One process's side: publishes wait while the keeper holds their topic."""

    def __init__(self, run_dir: Path, member: str) -> None:
        self._dir = fence_dir(run_dir)
        self.member = member
        self._held: dict[str, str] = {}  # topic -> token of the hold this member answered
        self._open = asyncio.Event()  # set while no topic is held
        self._open.set()
        self._writing: Counter[str] = Counter()
        self._written = asyncio.Event()  # a publish finished
        self._task: asyncio.Task[None] | None = None
        self.holds = 0

    async def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        write_file(self._dir / f"{self.member}{MEMBER}", str(os.getpid()))
        self._task = asyncio.create_task(self._watch(), name="fences")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        (self._dir / f"{self.member}{MEMBER}").unlink(missing_ok=True)
        self._held.clear()
        self._open.set()

    def holding(self, topic: str) -> bool:
        """Whether the keeper holds ``topic`` now: it may be missing for a few milliseconds."""
        return topic in self._held

    @asynccontextmanager
    async def writing(self, topics: Iterable[str]) -> AsyncIterator[None]:
        """Around a publish to ``topics``: waits while one of them is held."""
        wanted = set(topics)
        while self._held and not wanted.isdisjoint(self._held):
            await self._open.wait()
        self._writing.update(wanted)
        try:
            yield
        finally:
            self._writing.subtract(wanted)
            self._written.set()

    async def _watch(self) -> None:
        while True:
            try:
                await self._poll()
            except OSError as exc:  # the run dir went away: the stack is stopping
                log.warning("fences: cannot read %s: %s", self._dir, exc)
            await asyncio.sleep(POLL_S)  # a poll interval, not a wait for something

    async def _poll(self) -> None:
        holds = {}
        for name in os.listdir(self._dir):
            if name.endswith(HOLD):
                with contextlib.suppress(OSError):
                    holds[name[: -len(HOLD)]] = (self._dir / name).read_text()
        for topic in [t for t, token in self._held.items() if holds.get(t) != token]:
            del self._held[topic]
            (self._dir / f"{topic}.{self.member}{HELD}").unlink(missing_ok=True)
        for topic, token in holds.items():
            if self._held.get(topic) != token:
                self._held[topic] = token
                self._open.clear()
                await self._wait_written(topic)
                write_file(self._dir / f"{topic}.{self.member}{HELD}", token)
                self.holds += 1
        if not self._held:
            self._open.set()

    async def _wait_written(self, topic: str) -> None:
        """Until no publish to ``topic`` is under way in this process."""
        while self._writing[topic] > 0:
            self._written.clear()
            await self._written.wait()
