"""What runs beside the stack during a soak (``bench/soak.py``): the async jobs and their
answers, the samples of the stack's processes and of the keeper's file, and the generator's log
read as it grows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from bench.soak_checks import KeeperSample, KeeperState, keeper_sample, read_keeper
from schemas.v1 import AUTO_MODEL, ChatRequest
from services.common.consumer import close_consumer
from services.common.fences import is_filler

# Jobs come in bursts, as batch work does: the embedded broker's keeper compacts the ingress only
# after a quiet probe interval (2 s), since it cannot hold producers outside the stack
# (docs/embedded-broker.md); a producer that never pauses keeps the ingress growing.
JOB_BATCH_S = 10.0
COMMIT_S = 1.0
# aiokafka retries a commit, a flush or a send to a broker it cannot reach with no end: every such
# wait is bounded, so a stack that died is reported rather than waited for.
KAFKA_WAIT_S = 10.0
ACKS_WAIT_S = 60.0


@dataclass
class Jobs:
    """Every job produced and the answers seen for it."""

    run: str
    produced: int = 0
    unsent: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    error_codes: Counter[str] = field(default_factory=Counter)
    results: int = 0
    strays: int = 0  # answers to request_ids this run did not send (or the broker refused)
    unreadable: int = 0
    commit_failures: int = 0
    failure: str = ""  # the producer's, when it stopped with an error

    def message(self) -> tuple[str, bytes]:
        i = self.produced
        self.produced += 1
        request = ChatRequest.model_validate(
            {
                "model": AUTO_MODEL,
                "request_id": f"soak-{self.run}-{i}",
                "messages": [
                    {"role": "system", "content": "You write release notes for a parcel service."},
                    {
                        "role": "user",
                        "content": f"Draft the release notes of build {i}: tracking page "
                        "faster, label printing fixed, two new carriers in the checkout.",
                    },
                ],
                "metadata": {"tenant": "soak", "task": "summarise"},
            }
        )
        self.answers[request.request_id] = 0
        return request.request_id, request.model_dump_json().encode()

    def refused(self, request_id: str) -> None:
        self.unsent += 1
        self.answers.pop(request_id, None)

    def note(self, value: bytes) -> None:
        try:
            outcome = json.loads(value)
            request_id, kind = outcome["request_id"], outcome.get("kind")
        except (ValueError, KeyError, TypeError):
            self.unreadable += 1
            return
        if request_id not in self.answers:
            self.strays += 1
            return
        self.answers[request_id] += 1
        if kind == "result":
            self.results += 1
        else:
            self.error_codes[str(outcome.get("code"))] += 1

    @property
    def unanswered(self) -> int:
        return sum(1 for n in self.answers.values() if n == 0)


async def produce_jobs(bootstrap: str, topic: str, jobs: Jobs, rate: float, until: float) -> None:
    """``rate`` jobs a second, a batch each ``JOB_BATCH_S``, until the wall-clock ``until``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    await producer.start()
    acks: set[asyncio.Task[None]] = set()

    async def ack(request_id: str, sent: asyncio.Future[Any]) -> None:
        try:
            await sent
        except (KafkaError, asyncio.CancelledError):  # cancelled: never acknowledged
            jobs.refused(request_id)

    try:
        owed, next_at = 0.0, time.monotonic()
        while time.time() < until:
            owed += rate * JOB_BATCH_S
            for _ in range(int(owed)):
                request_id, value = jobs.message()
                try:
                    sent = await producer.send(topic, value, key=request_id.encode())
                except KafkaError:
                    jobs.refused(request_id)
                    continue
                task = asyncio.create_task(ack(request_id, sent))
                acks.add(task)
                task.add_done_callback(acks.discard)
            owed -= int(owed)
            next_at += JOB_BATCH_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ACKS_WAIT_S):
                await asyncio.gather(*acks)
    finally:
        for task in list(acks):
            task.cancel()
        await asyncio.gather(*acks, return_exceptions=True)
        with contextlib.suppress(TimeoutError, KafkaError):
            async with asyncio.timeout(KAFKA_WAIT_S):
                await producer.stop()


class Answers:
    """The results topic, read by a consumer group that commits what it has read."""

    def __init__(self, bootstrap: str, topic: str, jobs: Jobs) -> None:
        self.jobs = jobs
        self.consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=f"soak-{jobs.run}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        self._last_commit = 0.0
        self._dirty = False

    async def start(self, timeout_s: float = 60.0) -> None:
        """Join the group and hold the topic's partitions, so no job is produced before."""
        await self.consumer.start()
        async with asyncio.timeout(timeout_s):
            while not self.consumer.assignment():
                await self.poll()

    async def poll(self) -> None:
        batches = await self.consumer.getmany(timeout_ms=500)
        for records in batches.values():
            for record in records:
                if not is_filler(record):  # the keeper's stand-in for compacted records
                    self.jobs.note(record.value)
            self._dirty = True
        if self._dirty and time.monotonic() - self._last_commit >= COMMIT_S:
            await self.commit()

    async def commit(self) -> None:
        try:
            async with asyncio.timeout(KAFKA_WAIT_S):
                await self.consumer.commit()
            self._dirty = False
        except (KafkaError, TimeoutError):
            self.jobs.commit_failures += 1
        self._last_commit = time.monotonic()

    async def stop(self) -> None:
        await self.commit()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KAFKA_WAIT_S):
                await close_consumer(self.consumer)


@dataclass
class Look:
    """One look at the stack, in wall-clock time (turned into a ``Sample`` once the load's start
    is known from the generator's log)."""

    wall: float
    cpu_pct: dict[str, float]
    rss_mb: dict[str, float]
    keeper: KeeperSample
    others_cores: float | None


class Sampler:
    """CPU % (of one core, since the previous look) and RSS of the stack's processes, what the
    rest of the machine used, and the keeper's file."""

    def __init__(self, procs: dict[str, int], ours: list[int], keeper_path: Path) -> None:
        self.procs: dict[str, psutil.Process] = {}
        for name, pid in procs.items():
            with contextlib.suppress(psutil.Error):
                self.procs[name] = psutil.Process(pid)
        self.ours = ours  # also counted as this run's CPU: the generator, this process
        self.keeper_path = keeper_path
        self.state: KeeperState | None = None
        self.looks: list[Look] = []
        self._cpu: dict[Any, float] = {}
        self._wall = time.time()
        psutil.cpu_percent(None)
        self.look(record=False)

    def _cpu_s(self, proc: psutil.Process) -> float | None:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    def look(self, record: bool = True) -> None:
        now = time.time()
        wall = max(now - self._wall, 1e-6)
        cpu_pct: dict[str, float] = {}
        rss: dict[str, float] = {}
        ours = 0.0
        extra = {f"pid-{pid}": psutil.Process(pid) for pid in self.ours if psutil.pid_exists(pid)}
        for name, proc in {**self.procs, **extra}.items():
            cpu = self._cpu_s(proc)
            if cpu is None:
                continue
            used = cpu - self._cpu.get(proc.pid, cpu)
            self._cpu[proc.pid] = cpu
            ours += used
            if name in self.procs:
                cpu_pct[name] = round(used / wall * 100, 1)
                with contextlib.suppress(psutil.Error):
                    rss[name] = round(proc.memory_info().rss / 2**20, 1)
        machine = psutil.cpu_percent(None) / 100 * (psutil.cpu_count() or 1)
        self._wall = now
        status, state = read_keeper(self.keeper_path)
        if state is not None:
            self.state = state  # an unreadable look keeps the last state, which then ages
        if record:
            others = round(max(0.0, machine - ours / wall), 2)
            keeper = keeper_sample(self.state, status, now)
            self.looks.append(Look(now, cpu_pct, rss, keeper, others))


class LogTail:
    """The generator's ``--log``, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[dict[str, Any]] = []
        self._pos = 0
        self._rest = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
        except FileNotFoundError:
            return []
        self._pos += len(data)
        *complete, self._rest = (self._rest + data).split(b"\n")
        new = [json.loads(line) for line in complete if line.strip()]
        self.lines.extend(new)
        return new
