"""The services wired in one event loop against the real broker, Redis and chDB (for tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.topics import Topics
from services.common.runtime import HttpServer, start_http, stop_http
from services.metrics.app import MetricsApp
from services.metrics.config import MetricsSettings
from services.router.app import create_app
from services.router.config import RouterSettings
from services.workers.app import WorkerApp
from services.workers.config import WorkerSettings
from switchboard.embedded import free_port
from tests.hangs import print_tasks

API_KEY = "sk-test-key"
START_S = 60.0  # a part's start, group join included
STOP_S = 45.0  # a part's stop, its drain included
SEND_S = 45.0  # one test record stored
T = TypeVar("T")


@dataclass
class Stack:
    base_url: str
    topics: Topics
    bootstrap: str
    workers: dict[str, WorkerApp]
    metrics: MetricsApp
    router_app: Any


# the ``stack_of`` fixture (conftest): a routing config's text and tiers → a running stack
StackOf = Callable[[str, list[str]], AbstractAsyncContextManager[Stack]]


def openai_sdk(stack: Stack) -> openai.AsyncOpenAI:
    """The official openai SDK on ``stack``'s front door (no retries: a test sees each answer).

    The router runs in the test's own event loop: a connect completes only when that loop gets
    to it, so the SDK's 5 s connect timeout (meant for a remote server) measures how long the
    loop was busy, not the router. A CI run lost a test to it while another test held both cores.
    """
    return openai.AsyncOpenAI(
        base_url=f"{stack.base_url}/v1",
        api_key=API_KEY,
        max_retries=0,
        timeout=httpx.Timeout(600.0, connect=60.0),
    )


def common(bootstrap: str, redis_url: str, prefix: str, config: Path) -> dict[str, Any]:
    return {
        "kafka_bootstrap": bootstrap,
        "redis_url": redis_url,
        "topic_prefix": prefix,
        "config": config,
        "partitions": 2,
        "reload_on_sighup": False,  # the test process's signals are pytest's
    }


@asynccontextmanager
async def running_stack(
    bootstrap: str,
    redis_url: str,
    prefix: str,
    config: Path,
    data_dir: Path,
    tiers: list[str],
    router: dict[str, Any] | None = None,
    embedded_run_dir: Path | None = None,
    metrics_port: int = 0,
    worker_http: bool = False,
) -> AsyncIterator[Stack]:
    """The services in this process; ``router`` adds RouterSettings fields; ``metrics_port``
    serves the metrics query endpoint (0: none); ``worker_http`` gives each worker its
    ``/health``, ``/ready`` and ``/metrics`` on a free port (``WorkerApp.http_port``). With
    ``embedded_run_dir`` they hold their writes when the embedded broker's keeper asks."""
    base = common(bootstrap, redis_url, prefix, config)
    if embedded_run_dir is not None:
        base.update(embedded_broker=True, run_dir=embedded_run_dir)
    metrics = MetricsApp(
        MetricsSettings(**base, data_dir=data_dir, metrics_port=metrics_port, batch_size=500)
    )
    workers = {
        t: WorkerApp(
            WorkerSettings(
                **base, tier=t, drain_timeout_s=5, worker_port=free_port() if worker_http else 0
            )
        )
        for t in tiers
    }
    app = create_app(RouterSettings(**base, api_key=API_KEY, port=0, **(router or {})))
    started: list[Any] = []
    http: tuple[HttpServer, asyncio.Task[None]] | None = None
    try:
        # the parts start at once: each start is mostly a consumer-group join, and none needs
        # another to be up first
        router_start = asyncio.ensure_future(start_http(app, "127.0.0.1", 0, lifespan=True))
        parts: list[tuple[str, Any]] = [("metrics service", metrics)]
        parts += [(f"{tier} worker", w) for tier, w in workers.items()]
        results = await asyncio.gather(
            *(within(START_S, f"the {name} to start", p.start()) for name, p in parts),
            return_exceptions=True,
        )
        # stopped in reverse: the router, then the workers, then metrics
        started += [p for (_, p), r in zip(parts, results, strict=True) if r is None]
        http = await within(START_S, "the router to start", router_start)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        port = http[0].bound_port  # type: ignore[attr-defined]
        stack = Stack(f"http://127.0.0.1:{port}", Topics(prefix), bootstrap, workers, metrics, app)
        await asyncio.gather(*(w.wait_assigned() for w in workers.values()))
        yield stack
    finally:
        # every part is stopped even if one does not stop in time; that one fails the test
        slow = []
        stops: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if http:
            stops.append(("the router", lambda: stop_http(*http)))
        stops += [(type(p).__name__, p.stop) for p in reversed(started)]
        for name, stop in stops:
            try:
                await within(STOP_S, f"{name} to stop", stop())
            except TimeoutError as exc:
                slow.append(str(exc))
        if slow:
            raise TimeoutError("; ".join(slow))


async def within(timeout_s: float, what: str, step: Awaitable[T]) -> T:
    """``await step``; if it takes over ``timeout_s``, print where every task waits (before
    cancelling it unwinds that) and raise a TimeoutError that names ``what``."""
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            print_tasks(f"waited {timeout_s:.0f} s for {what}")
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def produce(bootstrap: str, topic: str, *payloads: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 1024 * 1024)
    await within(START_S, "a test producer to start", producer.start())
    try:
        for p in payloads:
            await within(
                SEND_S, f"a test record to be stored on {topic}", producer.send_and_wait(topic, p)
            )
    finally:
        await within(STOP_S, "a test producer to stop", producer.stop())


async def collect(
    bootstrap: str, topic: str, until: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 60
) -> list[dict[str, Any]]:
    """Read ``topic`` from the start until ``until(messages)`` holds."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
        enable_auto_commit=False,
    )
    await within(START_S, f"a test consumer of {topic} to start", consumer.start())
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not until(seen):
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    seen.extend(json.loads(r.value) for r in records)
    except TimeoutError:
        shown = json.dumps(seen)[:2000]
        raise TimeoutError(
            f"{topic} after {timeout_s:.0f} s: {len(seen)} records {shown}"
        ) from None
    finally:
        await within(STOP_S, f"a test consumer of {topic} to stop", consumer.stop())
    return seen


async def wait_until(
    check: Callable[[], Any], timeout_s: float = 60, what: str = "condition"
) -> Any:
    async with asyncio.timeout(timeout_s):
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Infra:
    """This session's broker, Redis, chDB directory and simulator, with this test's topic prefix
    and scratch directory: what a test that builds its own stack starts from."""

    bootstrap: str
    redis_url: str
    prefix: str
    tmp_path: Path
    data_dir: Path
    simulator_url: str

    def config(self, text: str) -> Path:
        """``text`` as the test's routing config file."""
        path = self.tmp_path / "routing.yaml"
        path.write_text(text)
        return path

    def stack(
        self, config: Path, tiers: list[str], **options: Any
    ) -> AbstractAsyncContextManager[Stack]:
        """``running_stack`` on this infrastructure (options: router, metrics_port, ...)."""
        return running_stack(
            self.bootstrap, self.redis_url, self.prefix, config, self.data_dir, tiers, **options
        )

    def settings(self, config: Path) -> dict[str, Any]:
        """The settings every service takes, for a service the test starts itself."""
        return common(self.bootstrap, self.redis_url, self.prefix, config)
