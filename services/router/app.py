"""``create_app(settings)``: the router's HTTP API and Kafka handlers, wired; no logic here."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from schemas.topics import EVENTS_TABLE
from services.common import fences
from services.common.config_watch import ConfigWatch
from services.common.consumer import BatchConsumer
from services.common.control import ControlReader, LiveExperiments, ensure_control_topic
from services.common.kafka import (
    BrokerPublisher,
    KafkaBatchPublisher,
    ensure_topics,
    make_broker,
)
from services.common.routing_config import LoadedConfig, load_config
from services.common.runtime import serve_until_signal, start_http, stop_http
from services.router.config import RouterSettings
from services.router.errors import ApiError
from services.router.feedback import Owners, feedback_api
from services.router.handlers import IngressHandler, ReplyHandler
from services.router.http import HttpContext, api, install_error_handlers, key_dependency
from services.router.replies import ReplyReader, ReplySweeper, ReplyTopics
from services.router.service import PendingReplies, Router
from services.router.stage import SemanticStage
from services.router.watch import BrokerWatch

log = logging.getLogger("switchboard.router")
# Ingress batches routed while earlier ones wait for the broker to store their output.
INGRESS_IN_FLIGHT = 3


def create_app(settings: RouterSettings) -> FastAPI:
    config = load_config(settings.config)
    topics = settings.topics
    name = f"router-{settings.instance_id}"
    reply_topics = ReplyTopics(topics.replies(settings.instance_id), settings.reply_generation_size)
    layout = settings.topic_layout
    broker = make_broker(
        settings.kafka_bootstrap, name, settings.idempotent_producer, settings.max_message_bytes
    )
    holds = fences.for_process(settings.run_dir, settings.embedded_broker, name)
    publisher = BrokerPublisher(broker, holds, settings.max_message_bytes)
    control = ControlReader(settings.kafka_bootstrap, topics.control, f"{name}-control")
    live = LiveExperiments(config, control.states)
    owners = None
    if settings.metrics_url:
        token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        table = f"{settings.clickhouse_database}.{EVENTS_TABLE}"
        owners = Owners(settings.metrics_url, token, table)
    semantic = SemanticStage.for_config(
        config, settings.semantic_threads, settings.semantic_max_batch
    )
    router = Router(config, topics, publisher, settings.max_image_bytes, live, semantic)
    pending: set[asyncio.Task[Any]] = set()

    async def prepare(new: LoadedConfig) -> None:
        """Build the new config's semantic routes off the event loop, then apply it; a config
        the stage cannot serve (the extra missing) is refused and the one in force stays."""
        try:
            if router.semantic is None:
                router.semantic = await asyncio.to_thread(
                    SemanticStage.for_config,
                    new,
                    settings.semantic_threads,
                    settings.semantic_max_batch,
                )
            else:
                await asyncio.to_thread(router.semantic.prepare, new)
        except Exception:
            log.exception("config %s not applied: its semantic stage failed", new.hash)
            return
        router.apply_config(new)

    def apply(new: LoadedConfig) -> None:
        loop = asyncio.get_running_loop()
        work: list[Coroutine[Any, Any, Any]] = [
            # a tier the new config adds gets its topic (its workers must be started to serve it)
            ensure_topics(
                settings.kafka_bootstrap,
                [topics.tier(t) for t in new.tier_names],
                settings.partitions,
                layout=layout,
            )
        ]
        if new.spec.semantic is None:
            router.apply_config(new)
        else:
            work.append(prepare(new))
        for job in work:
            task = loop.create_task(job)
            pending.add(task)
            task.add_done_callback(pending.discard)

    config_watch = ConfigWatch(
        settings.kafka_bootstrap,
        topics.config,
        f"{name}-config",
        config,
        apply,
        settings.topic_layout,
    )
    replies = PendingReplies()
    batch_publisher = KafkaBatchPublisher(
        settings.kafka_bootstrap,
        f"{name}-ingress",
        holds,
        settings.idempotent_producer,
        settings.max_message_bytes,
    )
    ingress = IngressHandler(router, batch_publisher, name, settings.max_body_bytes)
    on_reply = ReplyHandler(replies, publisher, topics.dead_letter, name)

    sweeper = ReplySweeper(
        settings.kafka_bootstrap,
        topics,
        reply_topics.slots,
        grace_s=settings.reply_retention_minutes * 60,
    )
    reader = ReplyReader(
        settings.kafka_bootstrap,
        reply_topics,
        on_reply,
        settings.fetch_wait_interactive_ms,
        f"{name}-replies",
        layout,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tier_topics = [topics.tier(t) for t in config.tier_names]
        shared = [
            *tier_topics,
            topics.ingress,
            topics.results,
            topics.dead_letter,
            topics.events,
            topics.cancel,
            topics.feedback,
            topics.payloads,
        ]
        await ensure_topics(settings.kafka_bootstrap, shared, settings.partitions, layout=layout)
        await ensure_control_topic(settings.kafka_bootstrap, topics.control, layout)
        watch = BrokerWatch(
            settings.kafka_bootstrap,
            lambda: reply_topics.current,
            replies,
            lambda: reader.consumer,
            shared,
            settings.partitions,
            settings.ready_stall_s,
            reply_topics.partitions,
            holds.holding if holds is not None else lambda topic: False,
            layout,
        )
        ctx.broker_ready = lambda: watch.ready
        ctx.not_ready = watch.not_ready
        if holds is not None:
            await holds.start()
        await broker.start()
        # the shares and the config in force, before the first request is routed
        await asyncio.gather(
            control.start(), config_watch.start(settings.reload_on_sighup), reader.start()
        )
        await batch_publisher.start()
        # The ingress is a batch consumer: a fetched batch is routed, published in one go, and
        # committed once all of it is stored (FastStream's one-message-at-a-time subscriber pays
        # a broker round trip per publish: docs/hot-path.md).
        consumer = BatchConsumer(
            bootstrap=settings.kafka_bootstrap,
            topics=[topics.ingress],
            group_id=topics.router_group,
            handler=ingress,
            max_records=settings.ingress_batch,
            # throughput topic: a short wait only buys idle polling (Tansu holds every fetch
            # for the full wait; a real Kafka broker answers as soon as records arrive)
            fetch_max_wait_ms=settings.fetch_wait_batch_ms,
            client_id=f"{name}-ingress",
            max_in_flight=INGRESS_IN_FLIGHT,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            on_poison=ingress.poisoned,
            max_message_bytes=settings.max_message_bytes,
        )
        await consumer.start()
        await watch.start()
        sweeper.start()
        log.info("router %s: config %s (hash %s)", settings.instance_id, config.path, config.hash)
        try:
            yield
        finally:
            await sweeper.stop()
            await watch.stop()
            await consumer.stop()
            await batch_publisher.stop()
            replies.fail_all(
                ApiError(
                    503,
                    "the router is shutting down",
                    type="service_unavailable",
                    code="shutting_down",
                )
            )
            await reader.stop()
            await config_watch.stop()
            await control.stop()
            if owners is not None:
                await owners.close()
            await broker.stop()
            if holds is not None:
                await holds.stop()
            if router.semantic is not None:
                router.semantic.close()
            if not reader.keeps_topic:
                try:
                    await reader.delete_all()
                except Exception as exc:  # the broker may be gone already
                    log.warning("could not delete reply topics %s: %s", reply_topics.live(), exc)

    app = FastAPI(title="Switchboard router", version="1", lifespan=lifespan)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    ctx = HttpContext(
        router, replies, reply_topics, key, settings.reply_grace_s, settings.max_waiting
    )
    app.include_router(api(ctx))
    app.include_router(
        feedback_api(
            key_dependency(ctx), owners, publisher, topics.feedback, settings.feedback_wait_s
        )
    )
    install_error_handlers(app, settings.max_body_bytes)
    app.state.ctx = ctx
    app.state.ingress = ingress
    app.state.broker = broker
    app.state.reply_reader = reader
    app.state.reply_sweeper = sweeper
    app.state.on_reply = on_reply
    app.state.pid = os.getpid()
    app.state.config_watch = config_watch
    return app


async def run(settings: RouterSettings) -> None:
    server, task = await start_http(
        create_app(settings), settings.host, settings.port, lifespan=True
    )
    url = f"http://{settings.host}:{server.bound_port}"  # type: ignore[attr-defined]
    log.info("router listening on %s", url)
    settings.mark_ready("router", url)
    await serve_until_signal()
    await stop_http(server, task)
