"""``create_worker(settings)``: one tier's worker, wired; ``run(settings)``: serve until a signal."""

from __future__ import annotations

import asyncio
import logging
import os

from services.common import fences
from services.common.consumer import ConcurrentConsumer
from services.common.kafka import BrokerPublisher, ensure_topics, make_broker
from services.common.routing_config import load_config
from services.common.runtime import serve_until_signal
from services.workers.adapters.llm import LiteLLMClient, missing_keys
from services.workers.adapters.outcomes import RedisOutcomeStore
from services.workers.adapters.sent import SentCheck
from services.workers.config import WorkerSettings
from services.workers.handlers import RecordHandler
from services.workers.service import TierService

log = logging.getLogger("switchboard.worker")


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
        self.broker = make_broker(settings.kafka_bootstrap, name)
        self.fences = fences.for_process(settings.run_dir, settings.embedded_broker, name)
        publisher = BrokerPublisher(self.broker, self.fences)
        concurrency = settings.concurrency or tier.concurrency
        self.client = LiteLLMClient(max_connections=concurrency)
        self.outcomes = RedisOutcomeStore(settings.redis_url, settings.topic_prefix, name)
        self.sent = SentCheck(settings.kafka_bootstrap, f"{name}-sent")
        self.service = TierService(
            tier=settings.tier,
            config=config,
            topics=topics,
            publisher=publisher,
            client=self.client,
            outcomes=self.outcomes,
            sent=self.sent,
        )
        self.handler = RecordHandler(self.service, publisher, topics, name)
        wait = (
            settings.fetch_wait_interactive_ms if tier.interactive else settings.fetch_wait_batch_ms
        )
        self.consumer = ConcurrentConsumer(
            bootstrap=settings.kafka_bootstrap,
            topics=[topics.tier(settings.tier)],
            group_id=topics.worker_group(settings.tier),
            handler=self.handler,
            concurrency=concurrency,
            fetch_max_wait_ms=wait,
            client_id=name,
            drain_timeout_s=settings.drain_timeout_s,
            session_timeout_ms=settings.kafka_session_timeout_ms,
        )

    async def start(self) -> None:
        topics = self.settings.topics
        await ensure_topics(
            self.settings.kafka_bootstrap,
            [topics.tier(self.settings.tier), topics.events, topics.dead_letter, topics.results],
            self.settings.partitions,
        )
        await self.outcomes.start()
        if self.fences is not None:
            await self.fences.start()
        await self.broker.start()
        await self.consumer.start()

    async def wait_assigned(self, timeout_s: float = 60.0) -> None:
        await asyncio.wait_for(self.consumer.assigned.wait(), timeout_s)

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.broker.stop()
        if self.fences is not None:
            await self.fences.stop()
        await self.outcomes.close()
        await self.sent.close()
        await self.client.aclose()


async def run(settings: WorkerSettings) -> None:
    app = WorkerApp(settings)
    await app.start()
    await app.wait_assigned()
    log.info("worker for tier %s consuming %s", settings.tier, settings.topics.tier(settings.tier))
    settings.mark_ready(f"worker-{settings.tier}-{os.getpid()}")
    await serve_until_signal()
    log.info("worker for tier %s draining", settings.tier)
    await app.stop()
