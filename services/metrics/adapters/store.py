"""The one module that talks to ClickHouse, through clickhouse-connect.

``chdb:///dir`` runs the ClickHouse engine in this process (chDB); ``http(s)://…`` reaches a
server. Same client, same SQL. chDB lets one process open a directory, so every call goes through
one thread, and readers of an embedded store ask the metrics process (services/metrics/app.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import clickhouse_connect

from schemas.topics import EVENTS_TABLE
from schemas.v1 import AttemptEvent

COLUMNS = (
    "ts",
    "event_id",
    "request_id",
    "tier",
    "model",
    "provider",
    "rule",
    "config_hash",
    "attempt",
    "status",
    "error_code",
    "tokens_in",
    "tokens_out",
    "latency_ms",
    "ttft_ms",
    "cost_usd",
    "response_sha256",
    "tenant_hash",
)

DDL = """
CREATE TABLE IF NOT EXISTS {db}.{table} (
    ts              DateTime64(3, 'UTC') COMMENT 'when the attempt ended',
    event_id        String,
    request_id      String,
    tier            LowCardinality(String),
    model           LowCardinality(String) COMMENT 'label from the routing config',
    provider        LowCardinality(String),
    rule            LowCardinality(String) COMMENT 'rule that chose the tier',
    config_hash     LowCardinality(String),
    attempt         UInt16 COMMENT '0-based model call within the request',
    status          LowCardinality(String) COMMENT 'ok | error | timeout | rate_limited',
    error_code      LowCardinality(String),
    tokens_in       UInt32,
    tokens_out      UInt32,
    latency_ms      Float64,
    ttft_ms         Nullable(Float64),
    cost_usd        Float64 COMMENT 'from the litellm price map',
    response_sha256 String,
    tenant_hash     String
) ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (tier, model, ts)
TTL toDateTime(ts) + INTERVAL 7 DAY
SETTINGS non_replicated_deduplication_window = 10000
"""

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EventStore(Protocol):
    async def migrate(self) -> None: ...

    async def insert(self, events: Sequence[AttemptEvent]) -> None: ...

    async def query(self, sql: str) -> tuple[list[str], list[list[Any]]]: ...

    async def close(self) -> None: ...


def _client(url: str) -> Any:
    if url.startswith("chdb:///"):
        Path(url.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(dsn=url)


def dedup_token(events: Sequence[AttemptEvent]) -> str:
    """Same events → same token: a batch inserted twice (redelivery) is stored once."""
    digest = hashlib.sha256()
    for event_id in sorted(e.event_id for e in events):
        digest.update(event_id.encode())
    return digest.hexdigest()


def rows(events: Sequence[AttemptEvent]) -> list[list[Any]]:
    return [[getattr(e, c) for c in COLUMNS] for e in events]


class ClickHouseStore:
    def __init__(self, url: str, database: str) -> None:
        if not _IDENT.match(database):
            raise ValueError(f"clickhouse_database: {database!r} is not a plain identifier")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._url = url
        self._db = database
        self._table = f"{database}.{EVENTS_TABLE}"
        self._client: Any = None

    @property
    def table(self) -> str:
        return self._table

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _connect(self) -> Any:
        if self._client is None:
            self._client = _client(self._url)
        return self._client

    def _migrate(self) -> None:
        client = self._connect()
        client.command(f"CREATE DATABASE IF NOT EXISTS {self._db}")
        client.command(DDL.format(db=self._db, table=EVENTS_TABLE))

    async def migrate(self) -> None:
        await self._run(self._migrate)

    def _insert(self, events: Sequence[AttemptEvent]) -> None:
        self._connect().insert(
            self._table,
            rows(events),
            column_names=list(COLUMNS),
            settings={"insert_deduplication_token": dedup_token(events)},
        )

    async def insert(self, events: Sequence[AttemptEvent]) -> None:
        if events:
            await self._run(self._insert, events)

    def _query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        result = self._connect().query(sql, settings={"readonly": 1})
        return list(result.column_names), [list(r) for r in result.result_rows]

    async def query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        """Read-only: the engine refuses writes and DDL (``readonly=1``)."""
        return await self._run(self._query, sql)

    async def close(self) -> None:
        def _close() -> None:
            if self._client is not None:
                self._client.close()
                self._client = None

        await self._run(_close)
        self._pool.shutdown(wait=True)
