"""The one module that talks to ClickHouse, through clickhouse-connect.

``chdb:///dir`` runs the ClickHouse engine in this process (chDB); ``http(s)://…`` reaches a
server. Same client, same SQL. chDB lets one process open a directory, so every call goes through
one thread, and readers of an embedded store ask the metrics process (services/metrics/app.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import clickhouse_connect
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.topics import (
    DECISIONS_TABLE,
    EVENTS_1M_TABLE,
    EVENTS_TABLE,
    FEEDBACK_TABLE,
    MIGRATIONS_TABLE,
    PAYLOADS_TABLE,
    SHADOW_TABLE,
)
from schemas.v1 import AttemptEvent
from services.common import telemetry
from services.common.retry import Transient
from services.metrics.adapters.migrations import APPLIED_SQL, MIGRATIONS_DDL, Migration, pending
from services.metrics.domain.columns import TABLE_SCHEMA, dedup_token, events_table

PAYLOADS_TTL = "toDateTime(ts) + toIntervalDay({days})"  # as ClickHouse shows the TTL back
# Tables of the low-volume record topics (services/metrics/domain/records.py); migrations.py
# creates them.
RECORD_TABLES = frozenset({DECISIONS_TABLE, SHADOW_TABLE, FEEDBACK_TABLE, PAYLOADS_TABLE})

# ``stored`` looks rows up by event_id: its bloom filter (migrations.py) leaves the granules that
# may hold a few ids (with thousands of ids nearly every granule may; then the bound on ts below
# is what narrows the read).
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


def _insert_settings(token: str) -> dict[str, Any]:
    """A repeated insert (same token) is stored once, and counted once by the aggregate the
    materialized view feeds: without the second setting ClickHouse skips the block in llm_events
    but still passes it to the view."""
    return {
        "insert_deduplication_token": token,
        "deduplicate_blocks_in_dependent_materialized_views": 1,
    }


def chdb_missing(url: str) -> str | None:
    """Why ``url`` cannot be opened in this install, or None: chDB comes with the ``embedded``
    extra, which the production image leaves out."""
    if not url.startswith("chdb:") or importlib.util.find_spec("chdb") is not None:
        return None
    return (
        "SWITCHBOARD_CLICKHOUSE_URL is unset (or chdb://), so events would go to the embedded "
        "ClickHouse (chDB), and chDB is not installed: set SWITCHBOARD_CLICKHOUSE_URL to the "
        "ClickHouse server (e.g. http://clickhouse:8123), or install the embedded stack with "
        "pip install 'switchboard[embedded]'"
    )


def _client(url: str, credentials: Mapping[str, Any]) -> Any:
    if url.startswith("chdb:///"):
        Path(url.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(dsn=url)
    return clickhouse_connect.get_client(
        dsn=url, username=credentials.get("username"), password=credentials.get("password", "")
    )


class StoreUnavailable(Transient):
    """ClickHouse failed an insert or lookup of valid rows: retried with backoff."""


class ClickHouseStore:
    def __init__(
        self,
        url: str,
        database: str,
        payload_days: int = 7,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        """``credentials``: ``username`` and ``password`` of a ClickHouse server, if any."""
        if not _IDENT.match(database):
            raise ValueError(f"clickhouse_database: {database!r} is not a plain identifier")
        self._payload_days = int(payload_days)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._url = url
        self._credentials = dict(credentials or {})
        self._db = database
        self._table = f"{database}.{EVENTS_TABLE}"
        self._client: Any = None

    @property
    def table(self) -> str:
        return self._table

    @property
    def aggregate_table(self) -> str:
        """llm_events by minute (docs/clickhouse-schema.md: its columns and how to query them)."""
        return f"{self._db}.{EVENTS_1M_TABLE}"

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _connect(self) -> Any:
        if self._client is None:
            self._client = _client(self._url, self._credentials)
        return self._client

    def _migrate(self) -> None:
        client = self._connect()
        client.command(f"CREATE DATABASE IF NOT EXISTS {self._db}")
        client.command(MIGRATIONS_DDL.replace("{db}", self._db))
        applied = client.query(APPLIED_SQL.replace("{db}", self._db)).result_rows
        for migration in pending({version: checksum for version, _, checksum in applied}):
            for statement in migration.sql(self._db):
                client.command(statement)
            self._record(client, migration)
        self._sync_payload_ttl(client)

    def _record(self, client: Any, migration: Migration) -> None:
        client.insert(
            f"{self._db}.{MIGRATIONS_TABLE}",
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
        )

    def _sync_payload_ttl(self, client: Any) -> None:
        """The payloads' retention is a setting, not a migration: a table created with another
        one gets this one."""
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

    async def migrate(self) -> None:
        """Apply the migrations ``schema_migrations`` does not hold (migrations.py), then the
        payload retention. Raises ``MigrationEdited`` if an applied migration was changed."""
        await self._run(self._migrate)

    def _insert(self, table: pa.Table, token: str) -> None:
        # Arrow: far cheaper per row than clickhouse-connect encoding Python rows (docs/hot-path.md)
        self._connect().insert_arrow(self._table, table, settings=_insert_settings(token))

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
            settings=_insert_settings(token),
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
        started = time.perf_counter()
        try:
            result = await self._run(fn, *args)
        except Exception as exc:
            telemetry.clickhouse_failed(what)
            raise StoreUnavailable(f"ClickHouse {what} failed: {exc}"[:1000]) from exc
        if what == "insert":
            telemetry.CLICKHOUSE_INSERT_DURATION.observe(time.perf_counter() - started)
        return result

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
        try:
            return await self._run(self._query, sql)
        except Exception:
            telemetry.clickhouse_failed("query")
            raise

    async def close(self) -> None:
        def _close() -> None:
            if self._client is not None:
                self._client.close()
                self._client = None

        await self._run(_close)
        self._pool.shutdown(wait=True)
