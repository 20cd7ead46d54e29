"""``MetricsApp``: events topic → ClickHouse, plus the read-only query endpoint.

The query endpoint exists because an embedded (chDB) store can be opened by one process only:
while the metrics service owns it, ``switchboard sql`` and ``switchboard report`` ask here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common import fences
from services.common.consumer import BatchConsumer
from services.common.kafka import KafkaBatchPublisher, ensure_topics
from services.common.runtime import HttpServer, serve_until_signal, start_http, stop_http
from services.metrics.adapters.store import ClickHouseStore, EventStore
from services.metrics.config import MetricsSettings
from services.metrics.handlers import BatchHandler

log = logging.getLogger("switchboard.metrics")
MAX_SQL_BYTES = 100_000


def query_app(store: EventStore, token: str | None) -> Starlette:
    async def query(request: Request) -> Response:
        if token and not secrets.compare_digest(
            request.headers.get("authorization", ""), f"Bearer {token}"
        ):
            return JSONResponse({"error": {"message": "bad or missing bearer token"}}, 401)
        body = await request.body()
        if len(body) > MAX_SQL_BYTES:
            return JSONResponse({"error": {"message": "query too large"}}, 413)
        try:
            sql = (await request.json())["sql"]
            if not isinstance(sql, str) or not sql.strip():
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return JSONResponse(
                {"error": {"message": 'send {"sql": "<query>"}', "param": "sql"}}, 400
            )
        try:
            columns, rows = await store.query(sql)
        except Exception as exc:
            return JSONResponse({"error": {"message": str(exc)[:2000]}}, 400)
        payload = json.dumps({"columns": columns, "rows": rows}, default=str)
        return Response(payload, media_type="application/json")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/query", query, methods=["POST"]), Route("/health", health)])


class MetricsApp:
    def __init__(self, settings: MetricsSettings) -> None:
        self.settings = settings
        name = f"metrics-{os.getpid()}"
        topics = settings.topics
        self.store = ClickHouseStore(settings.store_url, settings.clickhouse_database)
        self.fences = fences.for_process(settings.run_dir, settings.embedded_broker, name)
        self.publisher = KafkaBatchPublisher(settings.kafka_bootstrap, name, self.fences)
        self.handler = BatchHandler(self.store, self.publisher, topics, name)
        self.consumer = BatchConsumer(
            bootstrap=settings.kafka_bootstrap,
            topics=[topics.events],
            group_id=topics.metrics_group,
            handler=self.handler,
            max_records=settings.batch_size,
            fetch_max_wait_ms=settings.fetch_wait_batch_ms,
            client_id=name,
            # the next batch is decoded while the previous one is being inserted
            max_in_flight=2,
            linger_ms=settings.insert_linger_ms,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            # the first batches after an assignment may repeat what a crashed owner inserted:
            # up to two batches (max_in_flight) were inserted and not committed
            on_assign=lambda: self.handler.recheck(2 * settings.batch_size),
        )
        self._http: tuple[HttpServer, asyncio.Task[None]] | None = None

    async def start(self) -> None:
        topics = self.settings.topics
        await self.store.migrate()
        await ensure_topics(
            self.settings.kafka_bootstrap,
            [topics.events, topics.dead_letter],
            self.settings.partitions,
        )
        if self.fences is not None:
            await self.fences.start()
        await self.publisher.start()
        await self.consumer.start()
        if self.settings.metrics_port:
            await self._start_query_server()

    async def _start_query_server(self) -> None:
        token = (
            self.settings.metrics_token.get_secret_value() if self.settings.metrics_token else None
        )
        app = query_app(self.store, token)
        self._http = await start_http(app, self.settings.metrics_host, self.settings.metrics_port)

    async def stop(self) -> None:
        await self.consumer.stop()
        if self._http:
            await stop_http(*self._http)
        await self.publisher.stop()
        if self.fences is not None:
            await self.fences.stop()
        self.handler.close()
        await self.store.close()


async def run(settings: MetricsSettings) -> None:
    app = MetricsApp(settings)
    await app.start()
    await asyncio.wait_for(app.consumer.assigned.wait(), 60)
    log.info("metrics writing %s to %s", settings.topics.events, app.store.table)
    settings.mark_ready("metrics")
    await serve_until_signal()
    await app.stop()
