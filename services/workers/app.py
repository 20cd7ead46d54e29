"""``WorkerApp(settings)``: one tier's worker, wired; ``run(settings)``: serve until a signal.

With ``worker_port`` set, the worker answers ``GET /health``, ``GET /ready`` and ``GET /metrics``
there (``WorkerApp.not_ready`` says what ready means; docs/metrics.md lists the series).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os

from starlette.applications import Starlette

from services.common import fences
from services.common.config_watch import ConfigWatch
from services.common.consumer import ConcurrentConsumer, consumer_not_ready
from services.common.kafka import (
    BrokerPublisher,
    ProducerPublisher,
    ensure_topics,
    make_broker,
    topic_exists,
)
from services.common.routing_config import load_config
from services.common.runtime import (
    HttpServer,
    health_routes,
    metrics_route,
    serve_until_signal,
    start_http,
    stop_http,
)
from services.workers.adapters.llm import LiteLLMClient, missing_keys
from services.workers.adapters.outcomes import RedisOutcomeStore
from services.workers.adapters.sent import SentCheck
from services.workers.cancels import Cancels
from services.workers.config import WorkerSettings
from services.workers.handlers import RecordHandler
from services.workers.service import TierService

log = logging.getLogger("switchboard.worker")
# How long a readiness probe waits for Kafka and for Redis to answer (both asked at once).
PROBE_TIMEOUT_S = 2.0


class WorkerApp:
    def __init__(self, settings: WorkerSettings) -> None:
        config = load_config(settings.config)
        if settings.tier not in config.spec.tiers:
            raise SystemExit(
                f"worker: unknown tier {settings.tier!r}; {config.path} defines {config.tier_names}"
            )
        tier = config.tier(settings.tier)
        if missing := missing_keys(tier.models):
            log.warning("tier %s: models need unset variables %s", settings.tier, missing)
        self.settings = settings
        self.config = config
        topics = settings.topics
        name = f"worker-{settings.tier}-{os.getpid()}"
        self.broker = make_broker(
            settings.kafka_bootstrap,
            name,
            settings.idempotent_producer,
            settings.max_message_bytes,
        )
        self.fences = fences.for_process(settings.run_dir, settings.embedded_broker, name)
        publisher = BrokerPublisher(self.broker, self.fences, settings.max_message_bytes)
        self.chunks = ProducerPublisher(
            settings.kafka_bootstrap,
            f"{name}-chunks",
            self.fences,
            settings.idempotent_producer,
            settings.max_message_bytes,
        )
        concurrency = settings.concurrency or tier.concurrency
        self.client = LiteLLMClient(max_connections=concurrency)
        self.outcomes = RedisOutcomeStore(
            settings.redis_url,
            settings.topic_prefix,
            name,
            outcome_ttl_s=settings.outcome_ttl_s,
            outcome_url=settings.outcome_redis_url,
            password=(
                settings.redis_password.get_secret_value() if settings.redis_password else None
            ),
        )
        self.sent = SentCheck(settings.kafka_bootstrap, f"{name}-sent")
        self.cancels = Cancels(settings.kafka_bootstrap, topics.cancel, f"{name}-cancels")
        self.service = TierService(
            tier=settings.tier,
            config=config,
            topics=topics,
            publisher=publisher,
            client=self.client,
            outcomes=self.outcomes,
            sent=self.sent,
            topic_exists=functools.partial(topic_exists, settings.kafka_bootstrap),
            cancels=self.cancels,
            chunk_publisher=self.chunks,
        )
        self.config_watch = ConfigWatch(
            settings.kafka_bootstrap, topics.config, f"{name}-config", config,
            self.service.apply_config, settings.topic_layout
        )  # fmt: skip
        self.handler = RecordHandler(self.service, publisher, topics, name)
        wait = (
            settings.fetch_wait_interactive_ms if tier.interactive else settings.fetch_wait_batch_ms
        )
        # the longest a handler call may take: the group keeps a member whose fetch loop is kept
        # from polling this long (services/common/consumer.py group_timeouts)
        self.longest_call_s = max(tier.request_timeout_s, tier.timeout_s)
        self.consumer = ConcurrentConsumer(
            bootstrap=settings.kafka_bootstrap,
            topics=[topics.tier(settings.tier)],
            group_id=self.consumer_group,
            handler=self.handler,
            concurrency=concurrency,
            fetch_max_wait_ms=wait,
            client_id=name,
            drain_timeout_s=settings.drain_timeout_s,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            on_poison=self.handler.poisoned,
            longest_call_s=self.longest_call_s,
            max_message_bytes=settings.max_message_bytes,
        )
        self._http: tuple[HttpServer, asyncio.Task[None]] | None = None
        self._phase = "starting"

    async def start(self) -> None:
        """Serve ``/health`` and ``/ready`` first (alive, not ready while the rest starts)."""
        if self.settings.worker_port:
            app = Starlette(routes=[*health_routes(self.not_ready), metrics_route()])
            self._http = await start_http(app, self.settings.worker_host, self.settings.worker_port)
        try:
            await self._start_consuming()
        except BaseException:
            await self._stop_http()
            raise
        self._phase = "running"

    async def _start_consuming(self) -> None:
        topics = self.settings.topics
        await ensure_topics(
            self.settings.kafka_bootstrap,
            [
                topics.tier(self.settings.tier),
                topics.events,
                topics.dead_letter,
                topics.results,
                topics.cancel,
                # a shadow or capture may come with a live config: their topics exist already
                topics.shadow,
                topics.payloads,
            ],
            self.settings.partitions,
            layout=self.settings.topic_layout,
        )
        # independent starts, each a few broker or Redis round trips: at once
        await asyncio.gather(
            self.cancels.start(),
            self.config_watch.start(self.settings.reload_on_sighup),
            self.outcomes.start(),
        )
        if self.fences is not None:
            await self.fences.start()
        await self.broker.start()
        await self.chunks.start()
        t = self.consumer.timeouts
        log.info(
            "tier %s: consumer group %s, session timeout %d ms (heartbeat %d ms), rebalance "
            "timeout %d ms, max poll interval %d ms (drain %g s, tier's longest call %g s)",
            self.settings.tier,
            self.consumer_group,
            t.session_ms,
            t.heartbeat_ms,
            t.rebalance_ms,
            t.max_poll_interval_ms,
            self.settings.drain_timeout_s,
            self.longest_call_s,
        )
        await self.consumer.start()

    async def wait_assigned(self, timeout_s: float = 60.0) -> None:
        await asyncio.wait_for(self.consumer.assigned.wait(), timeout_s)

    @property
    def http_port(self) -> int | None:
        """Where ``/health`` and ``/ready`` answer (the bound port, also when asked for 0)."""
        return self._http[0].bound_port if self._http else None  # type: ignore[attr-defined]

    async def not_ready(self) -> str | None:
        """Why this worker is not doing its tier's work as designed (``GET /ready``), or None.

        Ready means: the consumer's fetch loop runs; it has joined its group once (an assignment
        of no partitions counts: a group with more members than partitions keeps the extra
        ones idle, ready to take over when a member goes; a later rebalance does not count
        against it, the member is rejoining, not broken); Kafka answers now; and Redis answers.
        Without Redis the worker keeps serving (fail open) but a redelivered request costs a
        second model call and may be answered twice: that is degraded, so /ready says so while
        /health stays 200 (a restart would not bring Redis back).
        """
        if self._phase != "running":
            return self._phase
        if reason := consumer_not_ready(self.consumer, self.consumer_group):
            return reason
        kafka, redis = await asyncio.gather(self.broker.ping(PROBE_TIMEOUT_S), self._redis_ok())
        if not kafka:
            return (
                f"Kafka at {self.settings.kafka_bootstrap} did not answer in {PROBE_TIMEOUT_S:g} s"
            )
        if not redis:
            return (
                f"Redis did not answer in {PROBE_TIMEOUT_S:g} s: serving without de-duplication "
                "(fail open), a redelivered request may be answered twice"
            )
        return None

    @property
    def consumer_group(self) -> str:
        return self.settings.topics.worker_group(self.settings.tier)

    async def _redis_ok(self) -> bool:
        try:
            return await asyncio.wait_for(self.outcomes.ping(), PROBE_TIMEOUT_S)
        except TimeoutError:
            return False

    async def _stop_http(self) -> None:
        if self._http:
            await stop_http(*self._http)
            self._http = None

    async def stop(self) -> None:
        """Drain and close; ``/health`` answers until the end, ``/ready`` says why not."""
        self._phase = "shutting down: draining in-flight calls"
        await self.consumer.stop()
        await self.chunks.stop()
        await self.broker.stop()
        if self.fences is not None:
            await self.fences.stop()
        await self.outcomes.close()
        await self.sent.close()
        await self.cancels.stop()
        await self.config_watch.stop()
        await self.client.aclose()
        await self._stop_http()


async def run(settings: WorkerSettings) -> None:
    app = WorkerApp(settings)
    await app.start()
    if app.http_port:
        log.info("worker health: http://%s:%d/ready", settings.worker_host, app.http_port)
    await app.wait_assigned()
    log.info("worker for tier %s consuming %s", settings.tier, settings.topics.tier(settings.tier))
    settings.mark_ready(f"worker-{settings.tier}-{os.getpid()}")
    await serve_until_signal()
    log.info("worker for tier %s draining", settings.tier)
    await app.stop()
