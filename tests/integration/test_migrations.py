"""The schema migrations, the request-id index and the per-minute aggregate on the real engine
(chDB): a fresh store, a second start, a store made before migrations existed, an edited
migration, and the aggregate against the raw events it summarises."""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.topics import EVENTS_1M_TABLE, EVENTS_TABLE, MIGRATIONS_TABLE
from schemas.v1 import AttemptEvent
from services.metrics.adapters import migrations as migrations_module
from services.metrics.adapters.migrations import MIGRATIONS, Migration, MigrationEdited
from services.metrics.adapters.store import ClickHouseStore
from services.metrics.domain.columns import TABLE_SCHEMA, dedup_token, events_table

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

GRANULE = 8192  # ClickHouse's default index_granularity
NOW = datetime.now(UTC).replace(second=0, microsecond=0)

# llm_events as the code before migrations created it (its last DDL, with the event_id index)
OLD_EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS {db}.llm_events (
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
    INDEX event_id_idx event_id TYPE bloom_filter GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (tier, model, ts)
TTL toDateTime(ts) + INTERVAL 7 DAY
SETTINGS non_replicated_deduplication_window = 10000
"""


@pytest.fixture
async def store(chdb_data_dir: Path) -> AsyncIterator[ClickHouseStore]:
    store = ClickHouseStore(f"chdb://{chdb_data_dir}", f"migrate_{uuid.uuid4().hex[:8]}")
    try:
        yield store
    finally:
        await store.close()


def database(store: ClickHouseStore) -> str:
    return store.table.split(".")[0]


async def run(store: ClickHouseStore, call: Callable[[Any], Any]) -> Any:
    """``call(client)`` in the store's own thread (chDB: one thread owns the directory)."""
    return await store._run(lambda: call(store._connect()))


async def applied(store: ClickHouseStore) -> list[list[Any]]:
    _, found = await store.query(
        f"SELECT version, name, checksum, applied_at FROM {database(store)}.{MIGRATIONS_TABLE}"
        " ORDER BY version, applied_at"
    )
    return found


async def schema(store: ClickHouseStore) -> list[list[Any]]:
    """Every table's and view's definition, skip index and pending mutation in the database."""
    db = database(store)
    _, tables = await store.query(
        f"SELECT name, create_table_query FROM system.tables WHERE database = '{db}' ORDER BY name"
    )
    _, indexes = await store.query(
        f"SELECT table, name, expr FROM system.data_skipping_indices WHERE database = '{db}'"
        " ORDER BY table, name"
    )
    _, mutations = await store.query(
        f"SELECT table, command FROM system.mutations WHERE database = '{db}' ORDER BY create_time"
    )
    return tables + indexes + mutations


async def events_columns(store: ClickHouseStore) -> list[str]:
    _, found = await store.query(
        f"SELECT name FROM system.columns WHERE database = '{database(store)}'"
        f" AND table = '{EVENTS_TABLE}' ORDER BY position"
    )
    return [row[0] for row in found]


async def test_a_fresh_store_records_every_migration_in_order(store: ClickHouseStore) -> None:
    await store.migrate()
    found = await applied(store)
    assert [(r[0], r[1], r[2]) for r in found] == [
        (m.version, m.name, m.checksum) for m in MIGRATIONS
    ]
    assert [r[3] for r in found] == sorted(r[3] for r in found)
    # the insert's Arrow schema is the table's, column for column (insert_arrow goes by name,
    # so a column missing from the table would fail every insert)
    assert await events_columns(store) == TABLE_SCHEMA.names
    _, tables = await store.query(
        f"SELECT name FROM system.tables WHERE database = '{database(store)}' ORDER BY name"
    )
    assert [t[0] for t in tables] == sorted(
        [
            "decisions",
            EVENTS_TABLE,
            EVENTS_1M_TABLE,
            f"{EVENTS_1M_TABLE}_mv",
            "llm_feedback",
            "llm_payloads",
            "llm_shadow",
            MIGRATIONS_TABLE,
        ]
    )


async def test_migrating_again_changes_nothing(store: ClickHouseStore) -> None:
    await store.migrate()
    before = (await applied(store), await schema(store))
    await store.migrate()
    await store.migrate()
    assert (await applied(store), await schema(store)) == before


async def test_a_store_made_before_migrations_upgrades_and_keeps_its_rows(
    store: ClickHouseStore,
) -> None:
    db = database(store)
    stored_at = NOW - timedelta(hours=2)  # inside the 7-day TTL

    def create_old(client: Any) -> None:
        client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        client.command(OLD_EVENTS_DDL.replace("{db}", db))
        for ddl in MIGRATIONS[2].statements[:4]:  # the record tables, as the old code made them
            client.command(ddl.replace("{db}", db))
        client.command(
            f"INSERT INTO {db}.{EVENTS_TABLE} (ts, event_id, request_id, tier, model, provider,"
            " rule, config_hash, attempt, status, latency_ms, tokens_in, variant) VALUES"
            f" ('{stored_at:%Y-%m-%d %H:%M:%S}', 'old', 'r-old', 'fast', 'm', 'p', 'r', 'h', 0,"
            " 'ok', 42.0, 7, 'baseline')"
        )

    await run(store, create_old)
    await store.migrate()
    assert [r[0] for r in await applied(store)] == [m.version for m in MIGRATIONS]
    assert await events_columns(store) == TABLE_SCHEMA.names
    _, indexes = await store.query(
        f"SELECT name FROM system.data_skipping_indices WHERE database = '{db}' ORDER BY name"
    )
    assert indexes == [["event_id_idx"], ["request_id_idx"]]
    _, rows = await store.query(
        f"SELECT event_id, retry, input_noise, context_window FROM {store.table}"
    )
    assert rows == [["old", 0, "", 0]]  # kept, the new columns at their defaults
    # the aggregate was filled from the rows stored before its view
    _, rolled = await store.query(
        f"SELECT tier, model, variant, sum(attempts), sum(tokens_in), uniqMerge(requests),"
        f" quantilesTDigestMerge(0.5)(latency_ms) FROM {store.aggregate_table}"
        " GROUP BY tier, model, variant"
    )
    assert rolled == [["fast", "m", "baseline", 1, 7, 1, [42.0]]]
    # and counts what comes after it
    await store.insert([event(0, random.Random(0), NOW)])
    _, total = await store.query(f"SELECT sum(attempts) FROM {store.aggregate_table}")
    assert total == [[2]]


async def test_an_edited_applied_migration_is_refused_by_name(
    store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.migrate()
    third = MIGRATIONS[2]
    edited = Migration(third.version, third.name, (*third.statements, "SELECT 1"))
    monkeypatch.setattr(migrations_module, "MIGRATIONS", (*MIGRATIONS[:2], edited, *MIGRATIONS[3:]))
    with pytest.raises(MigrationEdited, match=r"migration 3 'record tables' was edited"):
        await store.migrate()


async def test_a_migration_added_later_is_applied_once(
    store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.migrate()
    later = Migration(
        MIGRATIONS[-1].version + 1,
        "a later column",
        ("ALTER TABLE {db}.llm_shadow ADD COLUMN IF NOT EXISTS later UInt8 DEFAULT 0",),
    )
    monkeypatch.setattr(migrations_module, "MIGRATIONS", (*MIGRATIONS, later))
    await store.migrate()
    await store.migrate()
    assert [r[:2] for r in await applied(store)][-2:] == [
        [MIGRATIONS[-1].version, MIGRATIONS[-1].name],
        [later.version, later.name],
    ]


# --- the request-id lookup -------------------------------------------------------------------------


def skip_granules(plan: list[list[Any]], index: str) -> tuple[int, int] | None:
    """(granules kept, granules before) by the skip index ``index``, if the plan uses it."""
    text = "\n".join(row[0] for row in plan)
    found = re.search(
        rf"Skip\s+Name: {index}\s+Description: [^\n]*\s+Parts: \d+/\d+\s+"
        r"Granules: (\d+)/(\d+)",
        text,
    )
    return (int(found[1]), int(found[2])) if found else None


async def test_a_lookup_by_request_id_reads_only_the_granules_its_index_lets_through(
    store: ClickHouseStore,
) -> None:
    await store.migrate()
    rng = random.Random(1)
    for part in range(4):  # four inserts, each a part a day (partitions) of 24k rows
        events = [event(part * 3 * GRANULE + i, rng, NOW) for i in range(3 * GRANULE)]
        await store.insert(events)
    wanted = request_id(5 * GRANULE)
    for where in (f"request_id = '{wanted}'", f"request_id IN ('{wanted}', 'absent')"):
        # the form services/router/feedback.py, the feedback check and replay use
        plan = (
            await store.query(f"EXPLAIN indexes = 1 SELECT * FROM {store.table} WHERE {where}")
        )[1]
        granules = skip_granules(plan, "request_id_idx")
        assert granules is not None, f"{where}: the request_id index is not used\n{plan}"
        kept, before = granules
        # its three attempts lie in up to three granules; the bloom filter may let a few more by
        assert kept <= 6 and before >= 24, (where, granules)
        _, found = await store.query(f"SELECT count() FROM {store.table} WHERE {where}")
        assert found == [[3]]


# --- the per-minute aggregate -------------------------------------------------------------------


def request_id(i: int) -> str:
    return f"req-{i // 3:08d}"  # three attempts a request


def event(i: int, rng: random.Random, now: datetime) -> AttemptEvent:
    """Attempt ``i``: spread over six days, three tiers, models, variants and configs, with
    errors, retries, fallbacks, escalations, noisy inputs and context windows among them."""
    status = rng.choice(["ok"] * 8 + ["error", "timeout"])
    return AttemptEvent(
        # within the raw table's 7 days (the aggregate keeps what llm_events has let expire)
        ts=now - timedelta(minutes=rng.randrange(6 * 24 * 60), milliseconds=rng.randrange(60_000)),
        request_id=request_id(i),
        tier=rng.choice(["fast", "balanced", "cascade"]),
        model=rng.choice(["gpt-4o-mini", "claude-haiku"]),
        provider="p",
        rule=rng.choice(["short", "fallback:gpt-4o-mini", "default"]),
        config_hash=rng.choice(["c1", "c2"]),
        attempt=i % 3,
        status=status,
        tokens_in=rng.randrange(10_000),
        tokens_out=rng.randrange(1_000),
        latency_ms=rng.lognormvariate(5, 1),
        ttft_ms=None if rng.random() < 0.3 else rng.uniform(5, 500),
        cost_usd=rng.uniform(0, 0.01),
        variant=rng.choice(["", "baseline", "candidate"]),
        cascade_step=rng.choice(["", "", "draft", "escalation"]),
        retry=rng.choice([0, 0, 0, 1, 2]),
        input_noise=rng.choice(["", "", "", "tagged", "truncated,garbled"]),
        context_window=rng.choice([0, 8_192, 128_000]),
    )


KEYS = "tier, model, variant, config_hash"
RAW_FIGURES = f"""
SELECT {KEYS},
    uniqExact(request_id), count(), countIf(status = 'ok'), countIf(status != 'ok'),
    countIf(input_noise != ''), countIf(input_noise != '' AND status != 'ok'),
    countIf(retry > 0), countIf(retry = 0 AND (attempt > 0 OR startsWith(rule, 'fallback:'))),
    countIf(cascade_step = 'escalation'), countIf(status = 'ok' AND ttft_ms IS NOT NULL),
    countIf(context_window > 0), sum(tokens_in), sum(tokens_out), round(sum(cost_usd), 9),
    round(maxIf(tokens_in / context_window, context_window > 0), 9)
FROM {{table}} GROUP BY {KEYS} ORDER BY {KEYS}
"""
MERGED_FIGURES = f"""
SELECT {KEYS},
    uniqMerge(requests), sum(attempts), sum(ok), sum(errors), sum(noisy), sum(noisy_errors),
    sum(retries), sum(fallbacks), sum(escalations), sum(streamed), sum(windowed), sum(tokens_in), sum(tokens_out),
    round(sum(cost_usd), 9), round(max(window_use_max), 9)
FROM {{table}} GROUP BY {KEYS} ORDER BY {KEYS}
"""
LEVELS = (0.5, 0.95, 0.99)
QUANTILES = f"""
SELECT {KEYS}, quantilesTDigestMerge{LEVELS}(latency_ms), quantilesTDigestMerge{LEVELS}(ttft_ms),
    quantilesTDigestMerge(0.5, 0.95)(window_use)
FROM {{table}} GROUP BY {KEYS} ORDER BY {KEYS}
"""
VALUES = f"""
SELECT {KEYS}, arraySort(groupArrayIf(latency_ms, status = 'ok')),
    arraySort(groupArrayIf(assumeNotNull(ttft_ms), status = 'ok' AND ttft_ms IS NOT NULL)),
    arraySort(groupArrayIf(tokens_in / context_window, context_window > 0))
FROM {{table}} GROUP BY {KEYS} ORDER BY {KEYS}
"""


def rank_error(values: list[float], estimate: float, level: float) -> float:
    """How far ``estimate`` is from ``level``, as a share of ``values`` (sorted) between them."""
    below = sum(v < estimate for v in values) / len(values)
    at_or_below = sum(v <= estimate for v in values) / len(values)
    return (
        0.0 if below <= level <= at_or_below else min(abs(below - level), abs(at_or_below - level))
    )


async def test_the_aggregate_merges_to_the_figures_of_the_raw_events(
    store: ClickHouseStore,
) -> None:
    await store.migrate()
    rng = random.Random(7)
    events = [event(i, rng, NOW) for i in range(30_000)]
    for start in range(0, len(events), 5_000):  # several inserts, several parts
        await store.insert(events[start : start + 5_000])
    raw = (await store.query(RAW_FIGURES.format(table=store.table)))[1]
    merged = (await store.query(MERGED_FIGURES.format(table=store.aggregate_table)))[1]
    assert len(raw) == 3 * 2 * 3 * 2
    assert merged == raw  # counts and sums exactly; distinct requests too, at this size

    # t-digest quantiles: within 2 % of the level in rank, against the values themselves
    estimates = (await store.query(QUANTILES.format(table=store.aggregate_table)))[1]
    values = (await store.query(VALUES.format(table=store.table)))[1]
    for estimate, exact in zip(estimates, values, strict=True):
        assert estimate[:4] == exact[:4]
        for got, among, levels in zip(
            estimate[4:], exact[4:], (LEVELS, LEVELS, (0.5, 0.95)), strict=True
        ):
            for level, value in zip(levels, got, strict=True):
                assert rank_error(among, value, level) <= 0.02, (estimate[:4], level, value)

    # a latency CDF: any levels merge from the column (its own are only the default)
    levels = ", ".join(f"{p / 100:.2f}" for p in range(1, 100))
    _, cdf = await store.query(
        f"SELECT model, quantilesTDigestMerge({levels})(latency_ms) FROM {store.aggregate_table}"
        " GROUP BY model ORDER BY model"
    )
    assert [len(row[1]) for row in cdf] == [99, 99]
    assert all(row[1] == sorted(row[1]) for row in cdf)


async def test_a_repeated_insert_is_stored_and_counted_once(store: ClickHouseStore) -> None:
    """The writer inserts a redelivered batch again with the same token."""
    await store.migrate()
    rng = random.Random(3)
    table = events_table([event(i, rng, NOW) for i in range(1_000)])
    token = dedup_token(table.column("event_id").combine_chunks())
    for _ in range(3):
        await store.insert_table(table, token)
    _, raw = await store.query(f"SELECT count() FROM {store.table}")
    _, rolled = await store.query(f"SELECT sum(attempts) FROM {store.aggregate_table}")
    assert raw == rolled == [[1_000]]


async def test_the_aggregate_migration_run_twice_counts_the_rows_before_it_once(
    store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas starting at once may both run migration 7 before either records it: the
    second backfill inserts nothing (same bound, same token)."""
    monkeypatch.setattr(migrations_module, "MIGRATIONS", MIGRATIONS[:-1])
    await store.migrate()  # a store of the release before the aggregate
    await store.insert([event(i, random.Random(i), NOW) for i in range(500)])
    monkeypatch.setattr(migrations_module, "MIGRATIONS", MIGRATIONS)

    def aggregate_migration(client: Any) -> None:
        for statement in MIGRATIONS[-1].sql(database(store)):
            client.command(statement)

    await run(store, aggregate_migration)  # one replica
    await store.migrate()  # the other, which records it
    assert [r[0] for r in await applied(store)] == [m.version for m in MIGRATIONS]
    _, raw = await store.query(f"SELECT count(), uniqExact(request_id) FROM {store.table}")
    _, rolled = await store.query(
        f"SELECT sum(attempts), uniqMerge(requests) FROM {store.aggregate_table}"
    )
    assert rolled == raw == [[500, 167]]
