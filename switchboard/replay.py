"""``switchboard replay``: requests the fleet answered, sent again to a candidate and compared.

    switchboard replay --since 2h --against sim-balanced-next          # a model of the config
    switchboard replay --since 2026-12-02T08:00 --until 2026-12-02T09:00 --against balanced
    switchboard replay --request-ids ids.txt --against new-routing.yaml --rate 5
    switchboard replay report RUN

What is replayed:
- the captured inputs (llm_payloads, ``capture`` on; redacted where they were captured) of the
  window, or of the ids in the file (one per line);
- the requests still held on the tier topics (Kafka) in that window, or with those ids, that
  were not captured: sent as they were routed. Nothing of them is stored but the comparison.
  ``--captured-only`` leaves them out.

Each goes through the shadow lane (the shadow topic, the shadow workers' group) with a Replay
that names the run and the candidate: a model the fleet's config knows (a tier's or an
experiment's), a tier (its first model), or a config file (the model that config would route
the request to). Nothing is returned to any client, and no tier's consumers wait for it.
The shadow worker compares each answer with the original's (llm_events: latency, tokens, cost,
response hash; llm_payloads: the answer's text, for similarity, when it was captured) and
writes the comparison to llm_shadow as the experiment ``replay-<run>``, side by side with the
original. The candidate's call is an llm_events row too (variant shadow).

``--rate`` paces the sending (requests a second). A progress bar follows the comparisons as
they land; the report is printed when all have (``switchboard replay report RUN`` prints it
again, per slice: services/metrics/domain/replay_report.py).

Exit codes: 0 all compared, 1 some never came back within ``--wait-s`` of the last one, or the
stack is not reachable, 2 bad arguments (named).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from schemas.control import (
    MAX_RUN,
    REPLAY_PREFIX,
    AgainstKind,
    BaselineAnswer,
    Replay,
    ShadowRequest,
)
from schemas.topics import EVENTS_TABLE, PAYLOADS_TABLE, SHADOW_TABLE, Topics
from schemas.v1 import ChatRequest, RoutedRequest
from services.common import fences
from services.common.config_watch import in_force, newest_applied
from services.common.consumer import close_consumer
from services.common.kafka import ProducerPublisher, partitions_of
from services.common.routing_config import ConfigError, LoadedConfig, load_config, load_config_text
from services.common.sql import literal, tenant_hash
from services.common.tansu import log_ends
from services.metrics.config import MetricsSettings
from services.metrics.domain.replay_report import replay_report_sql, slice_rows
from switchboard import progress
from switchboard.analyst import QueryFailed, format_table, run_query
from switchboard.canary import Location, locate

CHUNK = 500  # request ids per query
POLL_S = 1.0
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class BadArguments(ValueError):
    """Exit 2, with this message."""


def parse_when(text: str, now: datetime) -> datetime:
    """``2h``, ``30m``, ``1d``, ``90s`` ago, or an ISO time (UTC unless it says otherwise)."""
    found = _RELATIVE.match(text.strip())
    if found:
        return now - timedelta(**{_UNITS[found[2]]: float(found[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise BadArguments(
            f"{text!r} is neither a time (2026-12-02T08:00) nor an age (90s, 30m, 2h, 1d)"
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BadArguments(f"--request-ids {path}: {exc.strerror or exc}") from exc
    ids = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not ids:
        raise BadArguments(f"--request-ids {path}: no request id in it (one per line)")
    return ids


@dataclass(frozen=True)
class Against:
    kind: AgainstKind
    name: str
    config_text: str | None = None

    def describe(self) -> str:
        return f"{self.kind} {self.name}"


def resolve_against(value: str, config: LoadedConfig) -> Against:
    """A config file (it exists), else a tier, else a model of the config in force."""
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        try:
            load_config_text(text, path)
        except ConfigError as exc:
            raise BadArguments(f"--against {value}: {exc}") from exc
        return Against("config", str(path), text)
    if value in config.spec.tiers:
        return Against("tier", value)
    if config.model_named(value) is not None:
        return Against("model", value)
    raise BadArguments(
        f"--against {value!r}: not a file, a tier ({', '.join(config.tier_names)}) or a model "
        f"({', '.join(config.model_names)}) of the config in force ({config.path})"
    )


@dataclass
class Input:
    """One request to replay, with what its original did."""

    request_id: str
    request: ChatRequest
    tier: str
    rule: str
    config_hash: str
    tenant_hash: str
    source: Literal["captured", "kafka"]
    baseline: BaselineAnswer | None = None


@dataclass
class Selection:
    inputs: list[Input] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # captured but no longer a request
    missing: list[str] = field(default_factory=list)  # asked for by id, found nowhere


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def _in(ids: Iterable[str]) -> str:
    return "(" + ", ".join(literal(i) for i in ids) + ")"


def _rows(settings: MetricsSettings, sql: str, payloads: bool = False) -> list[dict[str, Any]]:
    columns, rows = run_query(sql, settings, payloads=payloads)
    return [dict(zip(columns, row, strict=True)) for row in rows]


def _window(since: datetime | None, until: datetime) -> str:
    low = f"ts >= toDateTime64({since.timestamp():.3f}, 3, 'UTC') AND " if since else ""
    return f"{low}ts < toDateTime64({until.timestamp():.3f}, 3, 'UTC')"


def captured_inputs(
    settings: MetricsSettings,
    since: datetime | None,
    until: datetime,
    ids: list[str] | None,
    limit: int,
) -> Selection:
    table = f"{settings.clickhouse_database}.{PAYLOADS_TABLE}"
    select = (
        "SELECT request_id, any(tenant_hash) AS tenant_hash, any(tier) AS tier, "
        "any(rule) AS rule, any(config_hash) AS config_hash, any(text) AS text, min(ts) AS at "
        f"FROM {table} WHERE kind = 'input' AND "
    )
    found: list[dict[str, Any]] = []
    if ids is None:
        found = _rows(
            settings,
            select + _window(since, until) + f" GROUP BY request_id ORDER BY at LIMIT {limit}",
            True,
        )
    else:
        for chunk in _chunks(ids):
            found += _rows(
                settings, select + f"request_id IN {_in(chunk)} GROUP BY request_id", True
            )
        found = sorted(found, key=lambda row: row["at"])[:limit]
    out = Selection()
    for row in found:
        try:
            body = json.loads(row["text"])
            request = ChatRequest.model_validate({**body, "request_id": row["request_id"]})
        except (ValueError, ValidationError):
            out.unreadable.append(row["request_id"])
            continue
        out.inputs.append(
            Input(
                row["request_id"],
                request,
                row["tier"],
                row["rule"],
                row["config_hash"],
                row["tenant_hash"],
                "captured",
            )
        )
    return out


async def kafka_inputs(
    bootstrap: str,
    topics: Topics,
    tiers: list[str],
    since: datetime | None,
    until: datetime,
    ids: set[str] | None,
    skip: set[str],
    limit: int,
) -> list[Input]:
    """The requests on the tier topics routed in the window (or with those ids), first routing
    only (a cross-tier fallback republishes the same request), not in ``skip``; at most
    ``limit``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="switchboard-replay",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    found: dict[str, Input] = {}
    until_ms = until.timestamp() * 1000
    since_ms = since.timestamp() * 1000 if since is not None else 0.0
    try:
        for tier in tiers:
            topic = topics.tier(tier)
            tps = [TopicPartition(topic, p) for p in sorted(await partitions_of(consumer, topic))]
            if not tps:
                continue
            consumer.assign(tps)
            ends = await log_ends(consumer, tps)
            starts: dict[TopicPartition, int] = {}
            if since is None:
                starts = {tp: o for tp, o in (await consumer.beginning_offsets(tps)).items()}
            else:
                at = await consumer.offsets_for_times(
                    {tp: int(since.timestamp() * 1000) for tp in tps}
                )
                starts = {tp: (o.offset if o is not None else ends[tp]) for tp, o in at.items()}
            for tp, start in starts.items():
                consumer.seek(tp, start)
            open_tps = {tp for tp in tps if starts[tp] < ends[tp]}
            async with asyncio.timeout(120):
                while open_tps and len(found) < limit:
                    batch = await consumer.getmany(*open_tps, timeout_ms=500)
                    for tp, records in batch.items():
                        for record in records:
                            if record.offset >= ends[tp] or record.timestamp >= until_ms:
                                open_tps.discard(tp)
                                break
                            if record.timestamp >= since_ms:  # Tansu may start us earlier
                                _take(record.value, tier, ids, skip, found)
                    for tp in list(open_tps):
                        if await consumer.position(tp) >= ends[tp]:
                            open_tps.discard(tp)
    finally:
        await close_consumer(consumer)
    return list(found.values())


def _take(
    value: bytes | None, tier: str, ids: set[str] | None, skip: set[str], found: dict[str, Input]
) -> None:
    try:
        routed = RoutedRequest.model_validate_json(value or b"")
    except ValidationError:
        return  # not a request (a poison record the worker dead-lettered)
    rid = routed.request_id
    if routed.attempt or rid in skip or rid in found or (ids is not None and rid not in ids):
        return
    found[rid] = Input(
        rid, routed.request, tier, routed.rule, routed.config_hash,
        tenant_hash(routed.request.metadata.tenant), "kafka",
    )  # fmt: skip


def attach_baselines(settings: MetricsSettings, inputs: list[Input]) -> None:
    """What each original did: its answering attempt in llm_events (the last ok one, else its
    last attempt: an error), and its captured answer's text."""
    events = f"{settings.clickhouse_database}.{EVENTS_TABLE}"
    payloads = f"{settings.clickhouse_database}.{PAYLOADS_TABLE}"
    attempts: dict[str, list[dict[str, Any]]] = {}
    texts: dict[str, str] = {}
    ids = [i.request_id for i in inputs]
    for chunk in _chunks(ids):
        for row in _rows(
            settings,
            "SELECT request_id, model, status, latency_ms, tokens_in, tokens_out, cost_usd, "
            f"response_sha256, ts FROM {events} WHERE request_id IN {_in(chunk)} "
            "AND variant != 'shadow' ORDER BY ts",
        ):
            attempts.setdefault(row["request_id"], []).append(row)
        for row in _rows(
            settings,
            f"SELECT request_id, any(text) AS text FROM {payloads} WHERE kind = 'output' "
            f"AND request_id IN {_in(chunk)} GROUP BY request_id",
            True,
        ):
            texts[row["request_id"]] = row["text"]
    for item in inputs:
        rows = attempts.get(item.request_id, [])
        ok = [r for r in rows if r["status"] == "ok"]
        last = ok[-1] if ok else (rows[-1] if rows else None)
        if last is None:
            item.baseline = BaselineAnswer(
                model="", latency_ms=0, tokens_in=0, tokens_out=0, cost_usd=0,
                response_sha256="", text="", status="unknown",
            )  # fmt: skip
            continue
        item.baseline = BaselineAnswer(
            model=last["model"],
            latency_ms=last["latency_ms"],
            tokens_in=last["tokens_in"],
            tokens_out=last["tokens_out"],
            cost_usd=last["cost_usd"],
            response_sha256=last["response_sha256"] if ok else "",
            text=texts.get(item.request_id, "") if ok else "",
            status="ok" if ok else "error",
        )


def mirror_of(item: Input, run: str, against: Against) -> ShadowRequest:
    assert item.baseline is not None
    routed = RoutedRequest(
        request=item.request,
        tier=item.tier,
        rule=item.rule or "replay",
        config_hash=item.config_hash,
        reply_to="",  # nobody waits for a replay's answer: the comparison is the result
    )
    replay = Replay(
        run=run,
        kind=against.kind,
        against=against.name,
        config_text=against.config_text,
        tenant_hash=item.tenant_hash,
        source=item.source,
    )
    return ShadowRequest(routed=routed, baseline=item.baseline, replay=replay)


def _landed(settings: MetricsSettings, run: str) -> int:
    table = f"{settings.clickhouse_database}.{SHADOW_TABLE}"
    rows = _rows(
        settings,
        f"SELECT uniqExact(request_id) AS n FROM {table} "
        f"WHERE experiment = {literal(REPLAY_PREFIX + run)}",
    )
    return int(rows[0]["n"]) if rows else 0


async def send_and_follow(
    where: Location,
    settings: MetricsSettings,
    mirrors: list[ShadowRequest],
    run: str,
    rate: float,
    wait_s: float,
) -> int:
    """Publish the mirrors at ``rate`` a second, then follow llm_shadow until every one has its
    comparison, or none came for ``wait_s``. The number that landed."""
    holds = fences.for_process(where.run_dir, where.run_dir is not None, "replay-cli")
    publisher = ProducerPublisher(where.bootstrap, "switchboard-replay", holds)
    if holds is not None:
        await holds.start()
    await publisher.start()
    topic = settings.topics.shadow
    total = len(mirrors)
    landed = 0
    with progress.counters("replay", ["sent", "compared"], total) as update:
        try:
            started = time.monotonic()
            next_poll = started + POLL_S
            for i, mirror in enumerate(mirrors):
                await publisher.publish(topic, mirror, key=mirror.routed.request_id)
                update("sent", i + 1)
                pause = started + (i + 1) / rate - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                if time.monotonic() >= next_poll:
                    landed = await asyncio.to_thread(_landed, settings, run)
                    update("compared", landed)
                    next_poll = time.monotonic() + POLL_S
        finally:
            await publisher.stop()
            if holds is not None:
                await holds.stop()
        last_change = time.monotonic()
        while landed < total and time.monotonic() - last_change < wait_s:
            await asyncio.sleep(POLL_S)
            now_landed = await asyncio.to_thread(_landed, settings, run)
            if now_landed != landed:
                landed, last_change = now_landed, time.monotonic()
                update("compared", landed)
    return landed


def print_report(settings: MetricsSettings, run: str, fmt: str = "table") -> int:
    table = f"{settings.clickhouse_database}.{SHADOW_TABLE}"
    columns, rows = run_query(replay_report_sql(table, run), settings)
    found = slice_rows(columns, rows)
    if not found:
        print(f"replay report: no comparison for run {run!r} in {table}", file=sys.stderr)
        return 1
    if fmt == "json":
        print(json.dumps([{**r.values, "flags": r.flags()} for r in found], default=str))
        return 0
    shown = list(columns)
    print(f"replay {run}: the candidate beside the original answers, per slice")
    print(
        format_table(
            [*shown, "flags"],
            [[*(r.values[c] for c in shown), "; ".join(r.flags()) or "-"] for r in found],
        )
    )
    flagged = [r for r in found if r.flags()]
    if flagged:
        print(f"regressions in {len(flagged)} slice(s): " + ", ".join(r.name for r in flagged))
    else:
        print("no regression flagged (services/metrics/domain/replay_report.py says what is)")
    return 0


@dataclass(frozen=True)
class ReplayArgs:
    against: str
    since: str | None = None
    until: str | None = None
    request_ids: str | None = None
    rate: float = 10.0
    run: str | None = None
    wait_s: float = 120.0
    captured_only: bool = False
    limit: int = 10_000


def _config_in_force(where: Location, settings: MetricsSettings) -> LoadedConfig:
    config = load_config(where.config)
    applied = asyncio.run(
        newest_applied(where.bootstrap, settings.topics.config, "switchboard-replay")
    )
    return in_force(config, applied)


@dataclass(frozen=True)
class Wanted:
    since: datetime | None
    until: datetime
    ids: list[str] | None


def wanted(args: ReplayArgs, now: datetime) -> Wanted:
    """What the arguments ask for; BadArguments, naming the argument, if they do not say."""
    since = parse_when(args.since, now) if args.since else None
    until = parse_when(args.until, now) if args.until else now
    ids = read_ids(Path(args.request_ids)) if args.request_ids else None
    if since is None and ids is None:
        raise BadArguments("say what to replay: --since (and --until), or --request-ids FILE")
    if since is not None and since >= until:
        raise BadArguments(f"--since {args.since} is not before --until ({until.isoformat()})")
    return Wanted(since, until, ids)


def _select(
    args: ReplayArgs,
    want: Wanted,
    where: Location,
    settings: MetricsSettings,
    config: LoadedConfig,
) -> Selection:
    since, until, ids = want.since, want.until, want.ids
    selection = captured_inputs(settings, since, until, ids, args.limit)
    room = args.limit - len(selection.inputs)
    if not args.captured_only and room > 0:
        have = {i.request_id for i in selection.inputs} | set(selection.unreadable)
        wanted = set(ids) if ids is not None else None
        held = asyncio.run(
            kafka_inputs(
                where.bootstrap,
                settings.topics,
                config.tier_names,
                since,
                until,
                wanted,
                have,
                room,
            )
        )
        selection.inputs += held[:room]
    if ids is not None and len(selection.inputs) < args.limit:  # else: past the limit
        got = {i.request_id for i in selection.inputs} | set(selection.unreadable)
        selection.missing = [i for i in ids if i not in got]
    return selection


def replay_command(args: ReplayArgs) -> int:
    settings = MetricsSettings()
    where = locate(settings)
    run = args.run or datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
    try:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", run) or len(run) > MAX_RUN:
            raise BadArguments(f"--run {run!r}: letters, digits, . _ - only, at most {MAX_RUN}")
        if args.rate <= 0:
            raise BadArguments(f"--rate {args.rate:g}: requests a second, more than 0")
        if args.limit < 1:
            raise BadArguments(f"--limit {args.limit}: at least 1")
        want = wanted(args, datetime.now(UTC))
        config = _config_in_force(where, settings)
        against = resolve_against(args.against, config)
        if _landed(settings, run):
            raise BadArguments(f"--run {run}: that run has comparisons already; name another")
        selection = _select(args, want, where, settings, config)
    except BadArguments as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    except QueryFailed as exc:
        print(f"replay: the metrics store refused: {exc}", file=sys.stderr)
        return 1
    except (OSError, KafkaError, TimeoutError) as exc:
        print(f"replay: cannot reach Kafka at {where.bootstrap}: {exc}", file=sys.stderr)
        return 1
    inputs = selection.inputs
    sources = {s: sum(1 for i in inputs if i.source == s) for s in ("captured", "kafka")}
    print(
        f"replay {run}: {len(inputs)} requests ({sources['captured']} captured, "
        f"{sources['kafka']} still on the tier topics) against {against.describe()} "
        f"at {args.rate:g}/s"
    )
    nowhere = "not captured" if args.captured_only else "found nowhere"
    for what, ids in (("unreadable captured inputs", selection.unreadable),
                      (f"request ids {nowhere}", selection.missing)):  # fmt: skip
        if ids:
            print(f"  {len(ids)} {what}, not replayed: {', '.join(ids[:10])}"
                  + (" ..." if len(ids) > 10 else ""))  # fmt: skip
    if len(inputs) >= args.limit:
        print(f"  --limit {args.limit} reached: the oldest {args.limit}, captured ones first")
    if not inputs:
        print("replay: nothing to replay (is capture on? docs/experiments.md)", file=sys.stderr)
        return 1
    try:
        attach_baselines(settings, inputs)
        mirrors = [mirror_of(i, run, against) for i in inputs]
        landed = asyncio.run(send_and_follow(where, settings, mirrors, run, args.rate, args.wait_s))
    except QueryFailed as exc:
        print(f"replay: the metrics store refused: {exc}", file=sys.stderr)
        return 1
    except (OSError, KafkaError) as exc:
        print(f"replay: cannot reach Kafka at {where.bootstrap}: {exc}", file=sys.stderr)
        return 1
    if landed < len(mirrors):
        print(
            f"replay {run}: {len(mirrors) - landed} of {len(mirrors)} not compared after "
            f"{args.wait_s:g} s without progress: is a shadow worker running (`switchboard "
            "shadow`)? Its comparisons land later if it is only slow; "
            f"`switchboard replay report {run}` then shows them",
            file=sys.stderr,
        )
    status = print_report(settings, run)
    return 1 if landed < len(mirrors) else status


def report_command(run: str, fmt: str = "table") -> int:
    try:
        return print_report(MetricsSettings(), run, fmt)
    except QueryFailed as exc:
        print(f"replay report: {exc}", file=sys.stderr)
        return 1
