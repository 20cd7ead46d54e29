"""The one module that talks to ClickHouse, through clickhouse-connect.

``chdb:///dir`` runs the ClickHouse engine in this process (chDB); ``http(s)://…`` reaches a
server. Same client, same SQL. chDB lets one process open a directory, so every call goes through
one thread, and readers of an embedded store ask the metrics process (services/metrics/app.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import clickhouse_connect
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.topics import (
    DECISIONS_TABLE,
    EVENTS_TABLE,
    FEEDBACK_TABLE,
    PAYLOADS_TABLE,
    SHADOW_TABLE,
)
from schemas.v1 import AttemptEvent
from services.common.retry import Transient
from services.metrics.domain.columns import TABLE_SCHEMA, dedup_token, events_table

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
    status          LowCardinality(String) COMMENT 'ok | error | timeout | rate_limited | cut_off | cancelled',
    error_code      LowCardinality(String),
    tokens_in       UInt32,
    tokens_out      UInt32,
    latency_ms      Float64,
    ttft_ms         Nullable(Float64),
    cost_usd        Float64 COMMENT 'from the litellm price map',
    response_sha256 String,
    tenant_hash     String,
    worker_config_hash LowCardinality(String) COMMENT 'the config the worker used (config_hash: the router''s)',
    experiment      LowCardinality(String) COMMENT 'the tier experiment the request was in, or empty',
    variant         LowCardinality(String) COMMENT 'baseline | candidate | shadow, or empty',
    share_pct       Float64 COMMENT 'the candidate share in force when the request was routed',
    route_score     Nullable(Float64) COMMENT 'the semantic stage''s best score, when it ran',
    cascade_step    LowCardinality(String) COMMENT 'draft | judge | escalation in a cascade tier, or empty',
    verdict         LowCardinality(String) COMMENT 'accepted | rejected on a draft''s row, or empty',
    verdict_reason  String COMMENT 'what the draft failed, or passed',
    INDEX {index}
) ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (tier, model, ts)
TTL toDateTime(ts) + INTERVAL 7 DAY
SETTINGS non_replicated_deduplication_window = 10000
"""

# Columns added since the table was first shipped: a table created before them gets them on
# start (rows stored before read as the default).
ADDED_COLUMNS = (
    "worker_config_hash LowCardinality(String) DEFAULT '' AFTER tenant_hash",
    "experiment LowCardinality(String) DEFAULT '' AFTER worker_config_hash",
    "variant LowCardinality(String) DEFAULT '' AFTER experiment",
    "share_pct Float64 DEFAULT 0 AFTER variant",
    "route_score Nullable(Float64) AFTER share_pct",
    "cascade_step LowCardinality(String) DEFAULT '' AFTER route_score",
    "verdict LowCardinality(String) DEFAULT '' AFTER cascade_step",
    "verdict_reason String DEFAULT '' AFTER verdict",
)
# the same, for the record tables
ADDED_RECORD_COLUMNS = {
    SHADOW_TABLE: (
        "baseline_tokens_in UInt32 DEFAULT 0 AFTER candidate_latency_ms",
        "candidate_tokens_in Nullable(UInt32) AFTER baseline_tokens_in",
        "baseline_status LowCardinality(String) DEFAULT 'ok' AFTER similarity_by",
        "slices Array(LowCardinality(String)) AFTER baseline_status",
    ),
}

DECISIONS_DDL = """
CREATE TABLE IF NOT EXISTS {db}.{table} (
    decided_at  DateTime64(3, 'UTC'),
    decision_id String,
    experiment  LowCardinality(String),
    tier        LowCardinality(String),
    candidate   LowCardinality(String),
    action      LowCardinality(String) COMMENT 'start | promote | hold | rollback | complete | pause | resume',
    share_from  Float64 COMMENT 'candidate share in %, before',
    share_to    Float64 COMMENT 'and after',
    reason      String,
    criteria    Array(String) COMMENT 'each criterion with its verdict',
    figures     String COMMENT 'JSON: the window figures per variant',
    by          LowCardinality(String) COMMENT 'controller instance, or operator',
    config_hash LowCardinality(String)
) ENGINE = ReplacingMergeTree
ORDER BY (experiment, decided_at, decision_id)
SETTINGS non_replicated_deduplication_window = 10000
"""

SHADOW_DDL = """
CREATE TABLE IF NOT EXISTS {db}.{table} (
    ts                   DateTime64(3, 'UTC') COMMENT 'when the comparison was made',
    comparison_id        String,
    experiment           LowCardinality(String),
    tier                 LowCardinality(String),
    request_id           String,
    share_pct            Float64 COMMENT 'share of the tier mirrored when it was routed',
    outcome              LowCardinality(String) COMMENT 'compared | candidate_failed | dropped',
    reason               String COMMENT 'why dropped, or the candidate error',
    baseline_model       LowCardinality(String),
    candidate_model      LowCardinality(String),
    baseline_latency_ms  Float64,
    candidate_latency_ms Nullable(Float64),
    baseline_tokens_in   UInt32,
    candidate_tokens_in  Nullable(UInt32),
    baseline_tokens_out  UInt32,
    candidate_tokens_out Nullable(UInt32),
    baseline_cost_usd    Float64,
    candidate_cost_usd   Nullable(Float64),
    same_response        Nullable(Bool) COMMENT 'equal response hashes',
    similarity           Nullable(Float64) COMMENT '0..1',
    similarity_by        LowCardinality(String) COMMENT 'text, or the judge model',
    baseline_status      LowCardinality(String) COMMENT 'ok | error | unknown (a replay''s)',
    slices               Array(LowCardinality(String)) COMMENT 'short, long, multimodal, ...'
) ENGINE = ReplacingMergeTree
PARTITION BY toDate(ts)
ORDER BY (experiment, ts, comparison_id)
TTL toDateTime(ts) + INTERVAL 7 DAY
SETTINGS non_replicated_deduplication_window = 10000
"""
FEEDBACK_DDL = """
CREATE TABLE IF NOT EXISTS {db}.{table} (
    ts          DateTime64(3, 'UTC') COMMENT 'when the feedback was given',
    feedback_id String,
    request_id  String,
    tenant_hash String COMMENT 'as in llm_events: the request was checked to be this tenant''s',
    score       Nullable(Float64) COMMENT '0 (wrong) to 1 (right)',
    label       LowCardinality(String),
    comment     String,
    source      LowCardinality(String) COMMENT 'api, or the judge / verifier that scored'
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (request_id, ts, feedback_id)
TTL toDateTime(ts) + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 10000
"""
PAYLOADS_DDL = """
CREATE TABLE IF NOT EXISTS {db}.{table} (
    ts          DateTime64(3, 'UTC') COMMENT 'when it was captured',
    payload_id  String,
    request_id  String,
    tenant_hash String,
    tier        LowCardinality(String),
    rule        LowCardinality(String),
    config_hash LowCardinality(String),
    model       LowCardinality(String) COMMENT 'output: the model that answered',
    kind        LowCardinality(String) COMMENT 'input | output',
    text        String CODEC(ZSTD(3)) COMMENT 'redacted where captured: input JSON or answer text',
    redactions  Map(String, UInt32) COMMENT 'what was replaced, by kind'
) ENGINE = ReplacingMergeTree
PARTITION BY toDate(ts)
ORDER BY (request_id, kind, payload_id)
TTL toDateTime(ts) + INTERVAL {days} DAY
SETTINGS non_replicated_deduplication_window = 10000
"""
PAYLOADS_TTL = "toDateTime(ts) + toIntervalDay({days})"  # as ClickHouse shows the TTL back
# Tables of the low-volume record topics (services/metrics/domain/records.py), by name.
RECORD_TABLES = {
    DECISIONS_TABLE: DECISIONS_DDL,
    SHADOW_TABLE: SHADOW_DDL,
    FEEDBACK_TABLE: FEEDBACK_DDL,
    PAYLOADS_TABLE: PAYLOADS_DDL,
}

# What ``stored`` looks rows up by: one bloom filter a granule (8192 rows), so a lookup of a few
# ids reads the granules that may hold them instead of the whole event_id column (with thousands
# of ids nearly every granule may; then the bound on ts below is what narrows the read).
EVENT_ID_INDEX_NAME = "event_id_idx"
EVENT_ID_INDEX = f"{EVENT_ID_INDEX_NAME} event_id TYPE bloom_filter GRANULARITY 1"
# The ids are a bound parameter (in the query text ClickHouse would stop at 256 KiB), sent this
# many bytes of ids at a time: over HTTP a large parameter is a form field, and ClickHouse takes
# at most 128 KiB in one (http_max_field_value_size).
LOOKUP_CHUNK_BYTES = 64 * 1024
# A record read again decodes to the ts its row was stored with, so the lookup is bounded by the
# rows' ts (partitions and primary key skip the rest); the margin only absorbs rounding.
LOOKUP_MARGIN_MS = 60_000
LOOKUP_SQL = """
SELECT event_id FROM {table}
WHERE ts BETWEEN fromUnixTimestamp64Milli({{low:Int64}}, 'UTC')
             AND fromUnixTimestamp64Milli({{high:Int64}}, 'UTC')
  AND event_id IN {{ids:Array(String)}}
"""

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EventStore(Protocol):
    @property
    def table(self) -> str: ...

    async def migrate(self) -> None: ...

    async def insert(self, events: Sequence[AttemptEvent]) -> None: ...

    async def insert_table(self, table: pa.Table, token: str) -> None: ...

    async def stored(self, rows: pa.Table) -> set[str]: ...

    async def query(self, sql: str) -> tuple[list[str], list[list[Any]]]: ...

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: list[list[Any]], token: str
    ) -> None: ...

    async def close(self) -> None: ...


def _lookups(rows: pa.Table) -> Iterator[dict[str, Any]]:
    """The parameters of ``LOOKUP_SQL`` for ``rows`` (event_id and ts columns), chunk by chunk."""
    sizes = pc.binary_length(rows.column("event_id")).to_numpy(zero_copy_only=False)
    ends = np.cumsum(sizes, dtype=np.int64)
    start = 0
    while start < rows.num_rows:
        done = int(ends[start - 1]) if start else 0
        stop = max(int(np.searchsorted(ends, done + LOOKUP_CHUNK_BYTES, side="right")), start + 1)
        chunk = rows.slice(start, stop - start)
        ts = pc.min_max(chunk.column("ts").cast(pa.int64()))
        yield {
            "ids": chunk.column("event_id").to_pylist(),
            "low": ts["min"].as_py() - LOOKUP_MARGIN_MS,
            "high": ts["max"].as_py() + LOOKUP_MARGIN_MS,
        }
        start = stop


def _client(url: str) -> Any:
    if url.startswith("chdb:///"):
        Path(url.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(dsn=url)


class StoreUnavailable(Transient):
    """ClickHouse failed an insert or lookup of valid rows: retried with backoff."""


class ClickHouseStore:
    def __init__(self, url: str, database: str, payload_days: int = 7) -> None:
        if not _IDENT.match(database):
            raise ValueError(f"clickhouse_database: {database!r} is not a plain identifier")
        self._payload_days = int(payload_days)
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
        client.command(DDL.format(db=self._db, table=EVENTS_TABLE, index=EVENT_ID_INDEX))
        for column in ADDED_COLUMNS:
            client.command(f"ALTER TABLE {self._table} ADD COLUMN IF NOT EXISTS {column}")
        for table, ddl in RECORD_TABLES.items():
            client.command(ddl.format(db=self._db, table=table, days=self._payload_days))
            for column in ADDED_RECORD_COLUMNS.get(table, ()):
                client.command(f"ALTER TABLE {self._db}.{table} ADD COLUMN IF NOT EXISTS {column}")
        # the payloads' own retention: a table created with another one gets this one
        created = client.query(
            "SELECT create_table_query FROM system.tables"
            " WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": self._db, "t": PAYLOADS_TABLE},
        ).result_rows[0][0]
        if PAYLOADS_TTL.format(days=self._payload_days) not in created:
            client.command(
                f"ALTER TABLE {self._db}.{PAYLOADS_TABLE} MODIFY TTL toDateTime(ts) + "
                f"INTERVAL {self._payload_days} DAY"
            )
        indexed = client.query(
            "SELECT count() FROM system.data_skipping_indices"
            " WHERE database = {db:String} AND table = {table:String} AND name = {name:String}",
            parameters={"db": self._db, "table": EVENTS_TABLE, "name": EVENT_ID_INDEX_NAME},
        ).result_rows[0][0]
        if not indexed:
            # A table created before the index: new parts get it at once; the parts it holds
            # get it from a background mutation (until then a lookup reads them whole).
            client.command(f"ALTER TABLE {self._table} ADD INDEX IF NOT EXISTS {EVENT_ID_INDEX}")
            client.command(f"ALTER TABLE {self._table} MATERIALIZE INDEX {EVENT_ID_INDEX_NAME}")

    async def migrate(self) -> None:
        await self._run(self._migrate)

    def _insert(self, table: pa.Table, token: str) -> None:
        # Arrow: far cheaper per row than clickhouse-connect encoding Python rows (docs/hot-path.md)
        self._connect().insert_arrow(
            self._table, table, settings={"insert_deduplication_token": token}
        )

    async def insert_table(self, table: pa.Table, token: str) -> None:
        """Rows shaped as ``TABLE_SCHEMA``; ``token`` de-duplicates a repeated insert."""
        if table.schema != TABLE_SCHEMA:
            raise ValueError(f"rows must be shaped as TABLE_SCHEMA, got {table.schema}")
        if table.num_rows:
            await self._store_call("insert", self._insert, table, token)

    async def insert(self, events: Sequence[AttemptEvent]) -> None:
        table = events_table(events)
        await self.insert_table(table, dedup_token(table.column("event_id").combine_chunks()))

    def _insert_rows(
        self, table: str, columns: Sequence[str], rows: list[list[Any]], token: str
    ) -> None:
        self._connect().insert(
            f"{self._db}.{table}",
            rows,
            column_names=list(columns),
            settings={"insert_deduplication_token": token},
        )

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: list[list[Any]], token: str
    ) -> None:
        """Rows of one of the record tables (``RECORD_TABLES``); ``token`` de-duplicates a
        repeated insert."""
        if table not in RECORD_TABLES:
            raise ValueError(f"{table!r} is not a record table")
        if rows:
            await self._store_call("insert", self._insert_rows, table, columns, rows, token)

    def _stored(self, lookups: list[dict[str, Any]]) -> set[str]:
        sql = LOOKUP_SQL.format(table=self._table)
        found: set[str] = set()
        for parameters in lookups:
            result = self._connect().query(sql, parameters=parameters)
            found.update(row[0] for row in result.result_rows)
        return found

    async def stored(self, rows: pa.Table) -> set[str]:
        """Which of these rows' events have a row already (records read again after a crash).

        ``rows`` needs the ``event_id`` and ``ts`` columns of ``TABLE_SCHEMA``."""
        if not rows.num_rows:
            return set()
        return set(await self._store_call("lookup", self._stored, list(_lookups(rows))))

    async def _store_call(self, what: str, fn: Any, *args: Any) -> Any:
        """An insert or lookup of rows already checked against the columns (decode): if it
        fails, the store is in trouble (down, too many parts, out of memory), not the rows.
        chDB reports all of it as ``DatabaseError``; it is retried, never dead-lettered."""
        try:
            return await self._run(fn, *args)
        except Exception as exc:
            raise StoreUnavailable(f"ClickHouse {what} failed: {exc}"[:1000]) from exc

    def _plan(self, parameters: dict[str, Any]) -> list[str]:
        sql = "EXPLAIN indexes = 1 " + LOOKUP_SQL.format(table=self._table)
        return [row[0] for row in self._connect().query(sql, parameters=parameters).result_rows]

    async def lookup_plan(self, rows: pa.Table) -> list[str]:
        """How ClickHouse reads for ``stored(rows)`` (its first query): the parts and granules
        each index leaves, as ``EXPLAIN indexes = 1`` lists them."""
        return list(await self._run(self._plan, next(_lookups(rows))))

    def _query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        try:
            result = self._connect().query(sql, settings={"readonly": 1})
        except Exception:
            # chDB keeps `readonly` on its session once a query fails under it (a refused DROP):
            # every insert after it would fail too. A new client is a new session.
            self._reconnect()
            raise
        return list(result.column_names), [list(r) for r in result.result_rows]

    def _reconnect(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

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
