"""``MetricsApp``: events topic → ClickHouse, plus the read-only query endpoint.

The query endpoint exists because an embedded (chDB) store can be opened by one process only:
while the metrics service owns it, ``switchboard sql`` and ``switchboard report`` ask here. It
also answers ``GET /report`` (the decision matrix and its charts, services/metrics/report_endpoint.py),
``GET /health``, ``GET /ready`` (``MetricsApp.not_ready`` says what ready means) and
``GET /metrics`` (docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from schemas.topics import DEFAULT_DATABASE, PAYLOADS_HEADER, PAYLOADS_TABLE
from services.common import fences
from services.common.consumer import BatchConsumer, consumer_not_ready
from services.common.kafka import KafkaBatchPublisher, ensure_topics
from services.common.runtime import (
    HttpServer,
    NotReady,
    health_routes,
    metrics_route,
    serve_until_signal,
    start_http,
    stop_http,
)
from services.metrics.adapters.store import ClickHouseStore, EventStore
from services.metrics.config import MetricsSettings
from services.metrics.handlers import BatchHandler, RecordsHandler
from services.metrics.report_endpoint import report_route

log = logging.getLogger("switchboard.metrics")
MAX_SQL_BYTES = 100_000
# How long a readiness probe waits for the store to answer ``SELECT 1``.
STORE_PROBE_S = 2.0


async def _ready_anyway() -> None:
    return None


def query_app(
    store: EventStore,
    token: str | None,
    not_ready: NotReady = _ready_anyway,
    database: str = DEFAULT_DATABASE,
) -> Starlette:
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
        if PAYLOADS_TABLE in sql.lower() and request.headers.get(PAYLOADS_HEADER) != "read":
            return JSONResponse(
                {
                    "error": {
                        "message": f"{PAYLOADS_TABLE} holds captured prompts and answers "
                        "(redacted); ask for it explicitly: `switchboard sql --payloads`, or "
                        f"the header {PAYLOADS_HEADER}: read",
                        "code": "payloads_need_a_flag",
                    }
                },
                403,
            )
        try:
            columns, rows = await store.query(sql)
        except Exception as exc:
            return JSONResponse({"error": {"message": str(exc)[:2000]}}, 400)
        payload = json.dumps({"columns": columns, "rows": rows}, default=str)
        return Response(payload, media_type="application/json")

    return Starlette(
        routes=[
            Route("/query", query, methods=["POST"]),
            report_route(store, token, database),
            *health_routes(not_ready),
            metrics_route(),
        ]
    )


class MetricsApp:
    def __init__(self, settings: MetricsSettings) -> None:
        self.settings = settings
        name = f"metrics-{os.getpid()}"
        topics = settings.topics
        self.store = ClickHouseStore(
            settings.store_url,
            settings.clickhouse_database,
            settings.payload_retention_days,
            settings.store_credentials,
        )
        self.fences = fences.for_process(settings.run_dir, settings.embedded_broker, name)
        self.publisher = KafkaBatchPublisher(
            settings.kafka_bootstrap,
            name,
            self.fences,
            settings.idempotent_producer,
            settings.max_message_bytes,
        )
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
            # records a crashed owner may have inserted and not committed are looked up first
            on_assign=self.handler.assigned,
            on_poison=self.handler.poisoned,
            max_message_bytes=settings.max_message_bytes,
        )
        # the low-volume topics (decisions, shadow comparisons): one consumer for all of them
        self.records = RecordsHandler(self.store, self.publisher, topics, name)
        self.records_consumer = BatchConsumer(
            bootstrap=settings.kafka_bootstrap,
            topics=list(self.records.tables),
            group_id=topics.records_group,
            handler=self.records,
            max_records=500,
            fetch_max_wait_ms=settings.fetch_wait_batch_ms * 5,  # a few a minute
            client_id=f"{name}-records",
            linger_ms=settings.insert_linger_ms,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            on_poison=self.records.poisoned,
            max_message_bytes=settings.max_message_bytes,
        )
        self._http: tuple[HttpServer, asyncio.Task[None]] | None = None
        self._phase = "starting"
        self._store_probe: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        """Serve the endpoint first (alive, not ready while the rest starts)."""
        if self.settings.metrics_port:
            await self._start_query_server()
        try:
            await self._start_writing()
        except BaseException:
            await self._stop_http()
            raise
        self._phase = "running"

    async def _start_writing(self) -> None:
        topics = self.settings.topics
        await self.store.migrate()
        await ensure_topics(
            self.settings.kafka_bootstrap,
            [topics.events, topics.dead_letter, *self.records.tables],
            self.settings.partitions,
            layout=self.settings.topic_layout,
        )
        if self.fences is not None:
            await self.fences.start()
        await self.publisher.start()
        # each start takes seconds on the embedded broker (the group coordinator's answer)
        await asyncio.gather(self.consumer.start(), self.records_consumer.start())

    async def _start_query_server(self) -> None:
        token = (
            self.settings.metrics_token.get_secret_value() if self.settings.metrics_token else None
        )
        app = query_app(self.store, token, self.not_ready, self.settings.clickhouse_database)
        self._http = await start_http(app, self.settings.metrics_host, self.settings.metrics_port)

    @property
    def http_port(self) -> int | None:
        """Where the endpoint answers (the bound port, also when asked for 0)."""
        return self._http[0].bound_port if self._http else None  # type: ignore[attr-defined]

    async def not_ready(self) -> str | None:
        """Why events are not being written now (``GET /ready``), or None.

        Ready means: the consumer's fetch loop runs, it has joined its group once (no partitions
        counts, as for a worker: an extra member is a standby), and the store answers
        ``SELECT 1`` within ``STORE_PROBE_S``. The probe goes through the store's one thread, so
        it also fails while an insert hangs there; a probe still waiting is shared by the next
        ones instead of queueing more behind it.
        """
        if self._phase != "running":
            return self._phase
        if reason := consumer_not_ready(self.consumer, self.settings.topics.metrics_group):
            return reason
        probe = self._store_probe
        if probe is None or probe.done():
            probe = self._store_probe = asyncio.ensure_future(self.store.query("SELECT 1"))
        try:
            await asyncio.wait_for(asyncio.shield(probe), STORE_PROBE_S)
        except TimeoutError:
            return f"ClickHouse did not answer SELECT 1 in {STORE_PROBE_S:g} s"
        except Exception as exc:
            # the endpoint needs no token: the error's text (hosts, SQL) goes to the log only
            log.warning("readiness probe: ClickHouse refused SELECT 1: %s", exc)
            return f"ClickHouse refused SELECT 1 ({type(exc).__name__}; see the log)"
        return None

    async def _stop_http(self) -> None:
        if self._http:
            await stop_http(*self._http)
            self._http = None

    async def stop(self) -> None:
        self._phase = "shutting down"
        await self.records_consumer.stop()
        await self.consumer.stop()
        await self._stop_http()
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
