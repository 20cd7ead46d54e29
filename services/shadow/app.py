"""``switchboard shadow``: the shadow worker, wired; no logic here (service.py).

It reads the shadow topic in its own consumer group, so a slow candidate never holds a tier's
consumers, and serves ``GET /health`` and ``GET /ready`` when given a port.
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiokafka import ConsumerRecord
from pydantic import ValidationError
from starlette.applications import Starlette

from schemas.control import ShadowRequest
from services.common import fences, telemetry
from services.common.config_watch import ConfigWatch
from services.common.consumer import ConcurrentConsumer, consumer_not_ready
from services.common.deadletter import from_record
from services.common.kafka import BrokerPublisher, ensure_topics, make_broker
from services.common.routing_config import LoadedConfig, load_config
from services.common.runtime import (
    HttpServer,
    health_routes,
    metrics_route,
    serve_until_signal,
    start_http,
    stop_http,
)
from services.shadow.config import ShadowSettings
from services.shadow.service import ShadowService
from services.workers.adapters.llm import LiteLLMClient

log = logging.getLogger("switchboard.shadow")


class ShadowApp:
    def __init__(self, settings: ShadowSettings) -> None:
        self.settings = settings
        self.config = load_config(settings.config)
        topics = settings.topics
        name = f"shadow-{os.getpid()}"
        self.name = name
        self.broker = make_broker(
            settings.kafka_bootstrap,
            name,
            settings.idempotent_producer,
            settings.max_message_bytes,
        )
        self.fences = fences.for_process(settings.run_dir, settings.embedded_broker, name)
        self.publisher = BrokerPublisher(self.broker, self.fences, settings.max_message_bytes)
        self.client = LiteLLMClient(max_connections=settings.shadow_concurrency)
        self.service = ShadowService(self.config, topics, self.publisher, self.client)
        self.dead_letters = 0
        self.config_watch = ConfigWatch(
            settings.kafka_bootstrap,
            topics.config,
            f"{name}-config",
            self.config,
            self._apply,
            settings.topic_layout,
        )
        self.consumer = ConcurrentConsumer(
            bootstrap=settings.kafka_bootstrap,
            topics=[topics.shadow],
            group_id=topics.shadow_group,
            handler=self.handle,
            concurrency=settings.shadow_concurrency,
            fetch_max_wait_ms=settings.fetch_wait_batch_ms,
            client_id=name,
            drain_timeout_s=settings.drain_timeout_s,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            on_poison=self.poisoned,
            max_message_bytes=settings.max_message_bytes,
        )
        self._http: tuple[HttpServer, asyncio.Task[None]] | None = None
        self._phase = "starting"

    def _apply(self, config: LoadedConfig) -> None:
        self.config = config
        self.service.config = config

    async def handle(self, record: ConsumerRecord) -> None:
        try:
            mirror = ShadowRequest.model_validate_json(record.value or b"")
        except ValidationError as exc:
            await self.poisoned(record, exc)
            return
        await self.service.handle(mirror)

    async def poisoned(self, record: ConsumerRecord, exc: Exception) -> None:
        letter = from_record(record, self.name, exc)
        await self.publisher.publish(self.settings.topics.dead_letter, letter)
        self.dead_letters += 1
        telemetry.dead_lettered("shadow", record.topic)

    async def not_ready(self) -> str | None:
        if self._phase != "running":
            return self._phase
        return consumer_not_ready(self.consumer, self.settings.topics.shadow_group)

    async def start(self) -> None:
        if self.settings.shadow_port:
            web = Starlette(routes=[*health_routes(self.not_ready), metrics_route()])
            self._http = await start_http(web, self.settings.shadow_host, self.settings.shadow_port)
        topics = self.settings.topics
        await ensure_topics(
            self.settings.kafka_bootstrap,
            [topics.shadow, topics.shadow_comparisons, topics.events, topics.dead_letter],
            self.settings.partitions,
            layout=self.settings.topic_layout,
        )
        if self.fences is not None:
            await self.fences.start()
        await self.broker.start()
        await self.config_watch.start(self.settings.reload_on_sighup)
        await self.consumer.start()
        self._phase = "running"

    async def wait_assigned(self) -> None:
        await self.consumer.assigned.wait()

    async def stop(self) -> None:
        self._phase = "shutting down"
        await self.consumer.stop()
        await self.config_watch.stop()
        await self.broker.stop()
        await self.client.aclose()
        if self.fences is not None:
            await self.fences.stop()
        if self._http is not None:
            await stop_http(*self._http)
            self._http = None


async def run(settings: ShadowSettings) -> None:
    app = ShadowApp(settings)
    await app.start()
    shadows = [e.name for e in app.config.experiments.values() if e.spec.mode == "shadow"]
    log.info("shadow worker %s: experiments %s", app.name, ", ".join(shadows) or "none")
    settings.mark_ready("shadow")
    await serve_until_signal()
    await app.stop()
