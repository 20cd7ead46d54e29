"""The ClickHouse schema, as numbered migrations the metrics service applies at start.

Each migration is a list of statements, templates over ``{db}``; ``store.ClickHouseStore.migrate``
runs the ones ``schema_migrations`` does not hold, in order, and records each with a checksum of
its statements. Every statement is safe to run twice (IF NOT EXISTS, a deduplicated insert):
two replicas may start at once, and a store made before migrations existed re-runs them all.

A migration once shipped is never edited: a changed one is refused at start, by name
(``MigrationEdited``). Change the schema by appending a migration (docs/clickhouse-schema.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from schemas.topics import (
    DECISIONS_TABLE,
    EVENTS_1M_TABLE,
    EVENTS_TABLE,
    FEEDBACK_TABLE,
    MIGRATIONS_TABLE,
    PAYLOADS_TABLE,
    SHADOW_TABLE,
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        """sha256 of the statements as written (before ``{db}`` is filled in), so the same
        migration has the same checksum in every database."""
        digest = hashlib.sha256()
        for statement in self.statements:
            digest.update(statement.strip().encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def sql(self, database: str) -> list[str]:
        return [s.replace("{db}", database) for s in self.statements]


class MigrationEdited(RuntimeError):
    """A migration the store has applied differs from the code's: the schema is not what the
    code believes, so the service refuses to start rather than skip it."""


MIGRATIONS_DDL = f"""
CREATE TABLE IF NOT EXISTS {{db}}.{MIGRATIONS_TABLE} (
    version    UInt32,
    name       String,
    checksum   String COMMENT 'sha256 of the statements as written (migrations.py)',
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY version
"""
# Two replicas starting at once may both record a version: one row per version remains after
# merges, and FINAL reads it so before then.
APPLIED_SQL = f"SELECT version, name, checksum FROM {{db}}.{MIGRATIONS_TABLE} FINAL"

_EVENTS = f"{{db}}.{EVENTS_TABLE}"
_AGGREGATE = f"{{db}}.{EVENTS_1M_TABLE}"
AGGREGATE_VIEW = f"{EVENTS_1M_TABLE}_mv"

# llm_events as first shipped; migration 2 adds the columns that came after.
EVENTS_FIRST_DDL = f"""
CREATE TABLE IF NOT EXISTS {_EVENTS} (
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
    tenant_hash     String
) ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (tier, model, ts)
TTL toDateTime(ts) + INTERVAL 7 DAY
SETTINGS non_replicated_deduplication_window = 10000
"""


def _add_columns(table: str, *columns: str) -> tuple[str, ...]:
    """A table created before ``columns`` gets them; rows stored before read as the default."""
    return tuple(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {c}" for c in columns)


def _bloom_index(name: str, column: str) -> tuple[str, ...]:
    """A bloom filter a granule (8192 rows), so a lookup of a few values reads the granules that
    may hold them. New parts get it at once; the parts stored before get it from a background
    mutation (until it is done, a lookup reads them whole)."""
    return (
        f"ALTER TABLE {_EVENTS} ADD INDEX IF NOT EXISTS {name} {column} "
        "TYPE bloom_filter GRANULARITY 1",
        f"ALTER TABLE {_EVENTS} MATERIALIZE INDEX {name}",
    )


EVENT_ID_INDEX_NAME = "event_id_idx"
REQUEST_ID_INDEX_NAME = "request_id_idx"

DECISIONS_DDL = f"""
CREATE TABLE IF NOT EXISTS {{db}}.{DECISIONS_TABLE} (
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
SHADOW_DDL = f"""
CREATE TABLE IF NOT EXISTS {{db}}.{SHADOW_TABLE} (
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
FEEDBACK_DDL = f"""
CREATE TABLE IF NOT EXISTS {{db}}.{FEEDBACK_TABLE} (
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
# Its TTL is the payload_retention_days setting: the store sets it after the migrations.
PAYLOADS_DDL = f"""
CREATE TABLE IF NOT EXISTS {{db}}.{PAYLOADS_TABLE} (
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
TTL toDateTime(ts) + INTERVAL 7 DAY
SETTINGS non_replicated_deduplication_window = 10000
"""

# --- the per-minute aggregate (docs/clickhouse-schema.md: its columns and how to query them) ----

# The raw events live 7 days; this is what answers longer ranges.
AGGREGATE_DAYS = 90
AGGREGATE_DDL = f"""
CREATE TABLE IF NOT EXISTS {_AGGREGATE} (
    minute         DateTime('UTC') COMMENT 'toStartOfMinute(ts)',
    tier           LowCardinality(String),
    model          LowCardinality(String),
    variant        LowCardinality(String),
    config_hash    LowCardinality(String),
    requests       AggregateFunction(uniq, String) COMMENT 'uniqMerge: distinct request_id',
    attempts       SimpleAggregateFunction(sum, UInt64),
    ok             SimpleAggregateFunction(sum, UInt64) COMMENT 'status = ''ok''',
    errors         SimpleAggregateFunction(sum, UInt64) COMMENT 'status != ''ok''',
    noisy          SimpleAggregateFunction(sum, UInt64) COMMENT 'input_noise != ''''',
    noisy_errors   SimpleAggregateFunction(sum, UInt64) COMMENT 'noisy and status != ''ok''',
    retries        SimpleAggregateFunction(sum, UInt64) COMMENT 'retry > 0',
    fallbacks      SimpleAggregateFunction(sum, UInt64) COMMENT 'first try of a model the request fell back to',
    escalations    SimpleAggregateFunction(sum, UInt64) COMMENT 'cascade_step = ''escalation''',
    streamed       SimpleAggregateFunction(sum, UInt64) COMMENT 'ok with a ttft: the samples of ttft_ms',
    windowed       SimpleAggregateFunction(sum, UInt64) COMMENT 'context_window > 0: the samples of window_use',
    tokens_in      SimpleAggregateFunction(sum, UInt64),
    tokens_out     SimpleAggregateFunction(sum, UInt64),
    cost_usd       SimpleAggregateFunction(sum, Float64),
    latency_ms     AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64) COMMENT 'ok attempts; any levels merge',
    ttft_ms        AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64) COMMENT 'ok attempts with a ttft',
    window_use     AggregateFunction(quantilesTDigest(0.5, 0.95), Float64) COMMENT 'tokens_in / context_window where known',
    window_use_max SimpleAggregateFunction(max, Float64)
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (tier, model, variant, config_hash, minute)
TTL minute + INTERVAL {AGGREGATE_DAYS} DAY
SETTINGS non_replicated_deduplication_window = 10000
"""
# One minute's rows of llm_events (aliased ``e``) as aggregate states. Source columns are named
# ``e.x`` because the output reuses their names (an alias would shadow the column).
_ROLLUP = f"""
SELECT
    toStartOfMinute(e.ts) AS minute,
    e.tier AS tier,
    e.model AS model,
    e.variant AS variant,
    e.config_hash AS config_hash,
    uniqState(e.request_id) AS requests,
    toUInt64(count()) AS attempts,
    toUInt64(countIf(e.status = 'ok')) AS ok,
    toUInt64(countIf(e.status != 'ok')) AS errors,
    toUInt64(countIf(e.input_noise != '')) AS noisy,
    toUInt64(countIf(e.input_noise != '' AND e.status != 'ok')) AS noisy_errors,
    toUInt64(countIf(e.retry > 0)) AS retries,
    toUInt64(countIf(e.retry = 0 AND (e.attempt > 0 OR startsWith(e.rule, 'fallback:'))))
        AS fallbacks,
    toUInt64(countIf(e.cascade_step = 'escalation')) AS escalations,
    toUInt64(countIf(e.status = 'ok' AND e.ttft_ms IS NOT NULL)) AS streamed,
    toUInt64(countIf(e.context_window > 0)) AS windowed,
    toUInt64(sum(e.tokens_in)) AS tokens_in,
    toUInt64(sum(e.tokens_out)) AS tokens_out,
    toFloat64(sum(e.cost_usd)) AS cost_usd,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(e.latency_ms, e.status = 'ok') AS latency_ms,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(
        assumeNotNull(e.ttft_ms), e.status = 'ok' AND e.ttft_ms IS NOT NULL) AS ttft_ms,
    quantilesTDigestStateIf(0.5, 0.95)(
        e.tokens_in / e.context_window, e.context_window > 0) AS window_use,
    toFloat64(maxIf(e.tokens_in / e.context_window, e.context_window > 0)) AS window_use_max
FROM {_EVENTS} AS e
"""
_ROLLUP_GROUP = "GROUP BY minute, tier, model, variant, config_hash"
AGGREGATE_VIEW_DDL = (
    f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{AGGREGATE_VIEW} TO {_AGGREGATE} AS"
    + _ROLLUP
    + _ROLLUP_GROUP
)
# The rows stored before the view: those with ts before the second after the view's creation
# (docs/clickhouse-schema.md: what this misses or counts twice). Both the bound and the token
# are the same for whoever runs it, so a second run (two replicas at once) inserts nothing.
AGGREGATE_BACKFILL = (
    f"INSERT INTO {_AGGREGATE} "
    f"SETTINGS insert_deduplication_token = '{EVENTS_1M_TABLE} backfill', max_threads = 1"
    + _ROLLUP
    + f"""WHERE e.ts < (
    SELECT toDateTime64(metadata_modification_time, 3, 'UTC') + toIntervalSecond(1)
    FROM system.tables WHERE database = '{{db}}' AND name = '{AGGREGATE_VIEW}')
"""
    + _ROLLUP_GROUP
    + " ORDER BY tier, model, variant, config_hash, minute"
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "llm_events",
        ("CREATE DATABASE IF NOT EXISTS {db}", EVENTS_FIRST_DDL),
    ),
    Migration(
        2,
        "llm_events worker, experiment and cascade columns",
        _add_columns(
            _EVENTS,
            "worker_config_hash LowCardinality(String) DEFAULT '' "
            "COMMENT 'the config the worker used (config_hash: the router''s)' AFTER tenant_hash",
            "experiment LowCardinality(String) DEFAULT '' "
            "COMMENT 'the tier experiment the request was in, or empty' AFTER worker_config_hash",
            "variant LowCardinality(String) DEFAULT '' "
            "COMMENT 'baseline | candidate | shadow, or empty' AFTER experiment",
            "share_pct Float64 DEFAULT 0 "
            "COMMENT 'the candidate share in force when the request was routed' AFTER variant",
            "route_score Nullable(Float64) "
            "COMMENT 'the semantic stage''s best score, when it ran' AFTER share_pct",
            "cascade_step LowCardinality(String) DEFAULT '' "
            "COMMENT 'draft | judge | escalation in a cascade tier, or empty' AFTER route_score",
            "verdict LowCardinality(String) DEFAULT '' "
            "COMMENT 'accepted | rejected on a draft''s row, or empty' AFTER cascade_step",
            "verdict_reason String DEFAULT '' "
            "COMMENT 'what the draft failed, or passed' AFTER verdict",
        ),
    ),
    Migration(
        3,
        "record tables",
        (
            DECISIONS_DDL,
            SHADOW_DDL,
            FEEDBACK_DDL,
            PAYLOADS_DDL,
            *_add_columns(
                f"{{db}}.{SHADOW_TABLE}",
                "baseline_tokens_in UInt32 DEFAULT 0 AFTER candidate_latency_ms",
                "candidate_tokens_in Nullable(UInt32) AFTER baseline_tokens_in",
                "baseline_status LowCardinality(String) DEFAULT 'ok' AFTER similarity_by",
                "slices Array(LowCardinality(String)) AFTER baseline_status",
            ),
        ),
    ),
    Migration(4, "llm_events event_id index", _bloom_index(EVENT_ID_INDEX_NAME, "event_id")),
    Migration(
        5,
        "llm_events retry, input_noise and context_window",
        _add_columns(
            _EVENTS,
            "retry UInt16 DEFAULT 0 "
            "COMMENT '0 = first try of this model in the request' AFTER verdict_reason",
            "input_noise LowCardinality(String) DEFAULT '' COMMENT 'why the input counts as "
            "noisy (comma-separated: tagged, truncated, garbled, very_long), or empty' AFTER retry",
            "context_window UInt32 DEFAULT 0 "
            "COMMENT 'the model''s maximum input tokens, 0 unknown' AFTER input_noise",
        ),
    ),
    Migration(6, "llm_events request_id index", _bloom_index(REQUEST_ID_INDEX_NAME, "request_id")),
    Migration(
        7,
        "llm_events_1m per-minute aggregate",
        (AGGREGATE_DDL, AGGREGATE_VIEW_DDL, AGGREGATE_BACKFILL),
    ),
)


def pending(
    applied: Mapping[int, str], migrations: tuple[Migration, ...] | None = None
) -> list[Migration]:
    """The migrations to run, in order, given the checksum recorded for each applied version.

    Raises ``MigrationEdited`` naming every applied migration whose statements changed since.
    Versions the code does not know (a newer release applied them) are left alone: migrations
    only add, so the older code still finds what it needs."""
    migrations = MIGRATIONS if migrations is None else migrations
    edited = [
        f"{m.version} {m.name!r}"
        for m in migrations
        if m.version in applied and applied[m.version] != m.checksum
    ]
    if edited:
        raise MigrationEdited(
            f"migration {', '.join(edited)} was edited after it was applied to this store "
            "(its checksum differs from the one in schema_migrations): restore it as it was "
            "and add a new migration for the change"
        )
    return [m for m in migrations if m.version not in applied]
