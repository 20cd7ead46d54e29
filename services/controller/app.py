"""``switchboard controller``: the canary controller, wired; no logic here (service.py).

Serves ``GET /health`` and ``GET /ready`` (ready: the control topic is read and the instance
knows whether it is the active one or a standby).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from starlette.applications import Starlette

from services.common import fences
from services.common.config_watch import ConfigWatch
from services.common.control import ControlReader, ensure_control_topic
from services.common.kafka import ProducerPublisher, ensure_topics
from services.common.routing_config import LoadedConfig, load_config
from services.common.runtime import (
    health_routes,
    metrics_route,
    serve_until_signal,
    start_http,
    stop_http,
)
from services.controller.adapters.figures import EndpointFigures
from services.controller.adapters.leader import Leadership
from services.controller.config import ControllerSettings
from services.controller.service import Controller

log = logging.getLogger("switchboard.controller")


class ControllerApp:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.config = load_config(settings.config)
        topics = settings.topics
        self.name = f"controller-{os.getpid()}"
        self.fences = fences.for_process(settings.run_dir, settings.embedded_broker, self.name)
        self.publisher = ProducerPublisher(
            settings.kafka_bootstrap,
            self.name,
            self.fences,
            settings.idempotent_producer,
            settings.max_message_bytes,
        )
        self.reader = ControlReader(
            settings.kafka_bootstrap, topics.control, f"{self.name}-control"
        )
        token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        self.figures = EndpointFigures(
            settings.metrics_url, token, settings.clickhouse_database, settings.query_timeout_s
        )
        self.leadership = Leadership(
            settings.kafka_bootstrap,
            topics.controller_leader,
            topics.controller_group,
            self.name,
            settings.kafka_session_timeout_ms,
            settings.topic_layout,
        )
        self.controller = Controller(
            self.config, topics, self.publisher, self.figures, self.reader.states,
            self.reader.apply, self.name,
        )  # fmt: skip
        self.config_watch = ConfigWatch(
            settings.kafka_bootstrap, topics.config, f"{self.name}-config", self.config,
            self._apply, settings.topic_layout
        )  # fmt: skip
        self._loop: asyncio.Task[None] | None = None
        self._ready = False

    def _apply(self, config: LoadedConfig) -> None:
        """Judge the next intervals by ``config``: its experiments, criteria and steps."""
        self.config = config
        self.controller.config = config

    async def not_ready(self) -> str | None:
        if not self._ready:
            return "starting"
        if not self.leadership.joined.is_set():
            return "joining the controller group"
        return None

    async def start(self) -> None:
        topics = self.settings.topics
        layout = self.settings.topic_layout
        await ensure_control_topic(self.settings.kafka_bootstrap, topics.control, layout)
        await ensure_topics(
            self.settings.kafka_bootstrap,
            [topics.decisions],
            self.settings.partitions,
            layout=layout,
        )
        if self.fences is not None:
            await self.fences.start()
        await self.publisher.start()
        await self.reader.start()
        await self.config_watch.start(self.settings.reload_on_sighup)
        await self.leadership.start()
        self._loop = asyncio.create_task(self._run(), name="controller")
        self._ready = True

    async def _run(self) -> None:
        while True:
            if self.leadership.leading:
                try:
                    await self.controller.tick()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the broker away: the next tick tries again
                    log.exception("controller tick failed")
            await asyncio.sleep(self.settings.controller_tick_s)

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        await self.leadership.stop()
        await self.config_watch.stop()
        await self.reader.stop()
        await self.publisher.stop()
        if self.fences is not None:
            await self.fences.stop()
        await self.figures.close()


async def run(settings: ControllerSettings) -> None:
    app = ControllerApp(settings)
    http = None
    if settings.controller_port:
        web = Starlette(routes=[*health_routes(app.not_ready), metrics_route()])
        http = await start_http(web, settings.controller_host, settings.controller_port)
    try:
        await app.start()
        names = ", ".join(app.config.experiments) or "none"
        log.info("controller %s: experiments %s (config hash %s)", app.name, names, app.config.hash)
        settings.mark_ready("controller")
        await serve_until_signal()
    finally:
        await app.stop()
        if http is not None:
            await stop_http(*http)
