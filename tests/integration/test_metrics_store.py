"""The event-id lookup on the real engine (chDB): it uses the skip index, fits any batch, and a
table created before the index gets it on migrate."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from schemas.topics import EVENTS_TABLE
from schemas.v1 import AttemptEvent
from services.common.retry import is_transient
from services.metrics.adapters import store as store_module
from services.metrics.adapters.migrations import EVENTS_FIRST_DDL, MIGRATIONS
from services.metrics.adapters.store import ClickHouseStore, StoreUnavailable
from services.metrics.domain.columns import TABLE_SCHEMA
from tests.integration.stack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GRANULE = 8192  # ClickHouse's default index_granularity


def rows(n: int, ts: datetime, start: int = 0) -> pa.Table:
    """``n`` rows with distinct ids, ``ts`` a millisecond apart."""
    columns: dict[str, Any] = {name: [""] * n for name in TABLE_SCHEMA.names}
    columns |= {
        "ts": [ts + timedelta(milliseconds=i) for i in range(n)],
        "event_id": [uuid.UUID(int=start + i).hex for i in range(n)],
        "attempt": [0] * n,
        "tokens_in": [0] * n,
        "tokens_out": [0] * n,
        "retry": [0] * n,
        "context_window": [0] * n,
        "latency_ms": [1.0] * n,
        "ttft_ms": [None] * n,
        "cost_usd": [0.0] * n,
        "share_pct": [0.0] * n,
        "route_score": [None] * n,
    }
    return pa.table(columns, schema=TABLE_SCHEMA)


def skip_index_granules(plan: list[str]) -> tuple[int, int] | None:
    """(granules kept, granules before) by the event_id skip index, if the plan uses it."""
    text = "\n".join(plan)
    found = re.search(
        r"Skip\s+Name: event_id_idx\s+Description: [^\n]*\s+Parts: \d+/\d+\s+"
        r"Granules: (\d+)/(\d+)",
        text,
    )
    return (int(found[1]), int(found[2])) if found else None


@pytest.fixture
async def store(chdb_data_dir: Path) -> AsyncIterator[ClickHouseStore]:
    store = ClickHouseStore(f"chdb://{chdb_data_dir}", f"lookup_{uuid.uuid4().hex[:8]}")
    try:
        yield store
    finally:
        await store.close()


async def run(store: ClickHouseStore, call: Callable[[Any], Any]) -> Any:
    """``call(client)`` in the store's own thread (chDB: one thread owns the directory)."""
    return await store._run(lambda: call(store._connect()))


NOW = datetime.now(UTC).replace(microsecond=0)


async def test_the_id_lookup_reads_only_the_granules_the_skip_index_lets_through(
    store: ClickHouseStore,
) -> None:
    await store.migrate()
    table = rows(12 * GRANULE, NOW)
    await store.insert_table(table, "t1")
    looked_for = pa.concat_tables([table.slice(5, 2), table.slice(11 * GRANULE, 1)])
    granules = skip_index_granules(await store.lookup_plan(looked_for))
    assert granules is not None, "the lookup does not use the event_id skip index"
    kept, before = granules
    assert kept <= 3 < before
    assert await store.stored(looked_for) == set(looked_for.column("event_id").to_pylist())


async def test_a_lookup_of_a_whole_large_batch_answers(
    store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20,000 ids (a default batch) would make a 720 KB query text; ClickHouse stops at 256 KiB."""
    await store.migrate()
    table = rows(30_000, NOW)
    await store.insert_table(table, "t1")
    looked_for = pa.concat_tables([table.slice(0, 20_000), rows(500, NOW, start=10**6)])
    assert await store.stored(looked_for) == set(table.slice(0, 20_000)["event_id"].to_pylist())
    monkeypatch.setattr(store_module, "LOOKUP_CHUNK_BYTES", 1000)  # in chunks, the same answer
    assert await store.stored(looked_for) == set(table.slice(0, 20_000)["event_id"].to_pylist())


async def test_rows_of_other_days_are_found_whatever_the_ts_of_the_lookup(
    store: ClickHouseStore,
) -> None:
    await store.migrate()
    days = [rows(10, NOW - timedelta(days=d), start=d * 100) for d in range(3)]
    for i, day in enumerate(days):
        await store.insert_table(day, f"t{i}")
    looked_for = pa.concat_tables([d.slice(0, 2) for d in days])
    assert await store.stored(looked_for) == set(looked_for["event_id"].to_pylist())
    plan = "\n".join(await store.lookup_plan(days[1].slice(0, 2)))
    assert re.search(r"Min-Max\s+Keys:\s+ts\s+Condition: [^\n]*\s+Parts: 1/3", plan), plan


async def test_a_table_created_before_the_index_gets_it_on_migrate(
    store: ClickHouseStore,
) -> None:
    db = store.table.split(".")[0]
    old_ddl = [EVENTS_FIRST_DDL, *MIGRATIONS[1].statements]  # llm_events before any index

    def create_old(client: Any) -> None:
        client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        for statement in old_ddl:
            client.command(statement.replace("{db}", db))

    await run(store, create_old)
    table = rows(4 * GRANULE, NOW).drop_columns(["retry", "input_noise", "context_window"])
    await run(store, lambda c: c.insert_arrow(store.table, table))
    assert skip_index_granules(await store.lookup_plan(table.slice(0, 1))) is None
    await store.migrate()
    await store.migrate()  # again: nothing to add or build

    async def built() -> bool:
        done = await run(
            store,
            lambda c: c.query(
                "SELECT count(), countIf(is_done) FROM system.mutations"
                " WHERE database = {db:String} AND table = {t:String}",
                parameters={"db": db, "t": EVENTS_TABLE},
            ).result_rows[0],
        )
        # one MATERIALIZE INDEX a skip index (event_id, request_id)
        assert done[0] == 2, f"two MATERIALIZE INDEX expected, found {done[0]}"
        return bool(done[1] == 2)

    await wait_until(built, 60, "the indexes built for the parts inserted before them")
    indexes = await run(
        store,
        lambda c: (
            c.query(
                "SELECT name, expr, type_full FROM system.data_skipping_indices"
                " WHERE database = {db:String} ORDER BY name",
                parameters={"db": db},
            ).result_rows
        ),
    )
    assert indexes == [
        ("event_id_idx", "event_id", "bloom_filter"),
        ("request_id_idx", "request_id", "bloom_filter"),
    ]
    granules = skip_index_granules(await store.lookup_plan(table.slice(0, 1)))
    assert granules is not None and granules[0] < granules[1]


async def test_a_failing_store_is_transient_so_the_batch_is_retried_not_dead_lettered(
    chdb_data_dir: Path,
) -> None:
    store = ClickHouseStore(f"chdb://{chdb_data_dir}/broken", "switchboard")
    await store.migrate()
    try:
        # the store breaks under us (the table goes)
        drop = "DROP TABLE switchboard.llm_events"
        await store._run(lambda: store._connect().command(drop))
        with pytest.raises(StoreUnavailable) as caught:
            event = AttemptEvent(
                request_id="r",
                tier="t",
                model="m",
                provider="p",
                rule="x",
                config_hash="h",
                attempt=0,
                status="ok",
            )
            await store.insert([event])
        assert is_transient(caught.value)
    finally:
        await store.close()


async def test_a_table_created_before_the_experiment_columns_gets_them_on_migrate(
    store: ClickHouseStore,
) -> None:
    db = store.table.split(".")[0]
    old_ddl = EVENTS_FIRST_DDL  # llm_events as first shipped
    assert "worker_config_hash" not in old_ddl
    before = datetime.now(UTC) - timedelta(hours=1)  # inside the 7-day TTL

    def create_old(client: Any) -> None:
        client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        client.command(old_ddl.replace("{db}", db))
        client.command(
            f"INSERT INTO {db}.{EVENTS_TABLE} (ts, event_id, request_id, tier, model, provider,"
            " rule, config_hash, attempt, status, error_code, tokens_in, tokens_out, latency_ms,"
            " cost_usd, response_sha256, tenant_hash) VALUES"
            f" ('{before:%Y-%m-%d %H:%M:%S}', 'old', 'r-old', 'fast', 'm', 'p', 'r', 'h', 0,"
            " 'ok', '', 1, 1, 1.0, 0, '', '')"
        )

    await run(store, create_old)
    await store.migrate()
    await store.migrate()  # again: nothing to add
    table = rows(3, NOW)
    await store.insert_table(table, "after")  # rows of the current shape go in
    _, found = await store.query(
        f"SELECT event_id, experiment, variant, share_pct, route_score FROM {store.table} "
        "ORDER BY event_id"
    )
    # a row stored before reads as outside any experiment, with no semantic score
    assert ["old", "", "", 0.0, None] in found
    assert len(found) == 4


async def test_a_refused_write_through_the_query_path_does_not_stop_inserts(
    store: ClickHouseStore,
) -> None:
    """chDB keeps `readonly` on its session after a query fails under it: a `switchboard sql
    "DROP TABLE ..."` (refused) used to leave every later insert failing."""
    await store.migrate()
    with pytest.raises(Exception, match="readonly"):
        await store.query(f"DROP TABLE {store.table}")
    table = rows(2, NOW, start=9_000_000)
    await store.insert_table(table, "after-a-refused-drop")
    found = await store.stored(table)
    assert found == {uuid.UUID(int=9_000_000 + i).hex for i in range(2)}
