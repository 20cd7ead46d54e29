"""``switchboard eval DATA.jsonl``: how well a routing config picks tiers on labelled prompts.

Each line of DATA.jsonl is one request and the tier it should go to::

    {"id": "maths-001", "class": "maths", "expected_tier": "reasoning", "prompt": "Find x if ..."}
    {"id": "img-001", "expected_tier": "vision", "messages": [{"role": "user", "content": [...]}]}

``prompt`` is one user message; ``messages`` is a whole conversation (OpenAI's format). ``id``
and ``class`` are optional. Every request is routed by the config as the router would (rules,
then the semantic stage when the config has one, then the default), in this process; nothing is
sent anywhere.

Printed: accuracy; precision and recall per tier; the confusion matrix; accuracy per class; which
rules fired and how often they were right; the time one decision takes (p50, p95); and what the
routing would cost, and its p50 latency, against sending everything to one tier: ``--baseline``,
by default the tier whose first model costs most per output token. Prices come from the config (``input_cost_per_mtok``
/ ``output_cost_per_mtok``, else litellm's price map for ``price_as``). Each tier's p50 latency
and mean output tokens come from the metrics store (successful attempts over ``--hours``); a tier
with no traffic there has no latency, and its output tokens are ``--output-tokens``, said so.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.v1 import AUTO_MODEL, ChatRequest
from services.common.capabilities import litellm_entry, needs
from services.common.routing_config import LoadedConfig, ModelSpec
from services.router.domain.classify import classify
from services.router.stage import SemanticStage
from switchboard import progress
from switchboard.analyst import format_table

DEFAULT_OUTPUT_TOKENS = 250.0  # output tokens per answer when the metrics store has none
TIMING_ROUNDS = 5  # each decision is timed this many times; its fastest counts (noise aside)


_KEYS = frozenset({"id", "class", "expected_tier", "prompt", "messages"})


class DataError(ValueError):
    """A line of the data file that is not a labelled request."""


@dataclass(frozen=True)
class Item:
    id: str
    klass: str
    expected: str
    request: ChatRequest


@dataclass(frozen=True)
class Routed:
    item: Item
    tier: str
    rule: str
    micros: float  # one decision, µs

    @property
    def right(self) -> bool:
        return self.tier == self.item.expected


def load_items(path: Path, tiers: Collection[str]) -> list[Item]:
    """The labelled requests of ``path``; ``DataError`` names the line and the field at fault."""
    items: list[Item] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror or exc}") from exc
    for number, line in enumerate(lines, start=1):
        if line.strip():
            items.append(_item(line, number, tiers))
    if not items:
        raise DataError(f"{path}: no labelled requests")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{path}: id {item.id!r} is used twice")
        seen.add(item.id)
    return items


def _item(line: str, number: int, tiers: Collection[str]) -> Item:
    where = f"line {number}"
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{where}: not a JSON object")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise DataError(
            f"{where}: unknown field {', '.join(map(repr, unknown))} "
            f"(a line takes {', '.join(sorted(_KEYS))})"
        )
    expected = raw.get("expected_tier")
    if not isinstance(expected, str) or expected not in tiers:
        raise DataError(
            f"{where}: 'expected_tier' must be a tier of the config ({', '.join(tiers)}), "
            f"not {expected!r}"
        )
    if ("prompt" in raw) == ("messages" in raw):
        raise DataError(f"{where}: give either 'prompt' (text) or 'messages' (a conversation)")
    if "prompt" in raw and not isinstance(raw["prompt"], str):
        raise DataError(f"{where}: 'prompt' must be text")
    messages = raw.get("messages") or [{"role": "user", "content": raw.get("prompt")}]
    try:
        request = ChatRequest.model_validate({"model": AUTO_MODEL, "messages": messages})
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{where}: '{name}': {first['msg']}") from exc
    return Item(
        id=str(raw.get("id") or where),
        klass=str(raw.get("class") or "-"),
        expected=expected,
        request=request,
    )


def route_all(items: Sequence[Item], config: LoadedConfig) -> list[Routed]:
    """Each item's decision, and the time it took (the fastest of ``TIMING_ROUNDS``; with a
    semantic stage, of 2, each encoding the text afresh)."""
    stage = SemanticStage.for_config(config)
    semantic = None if stage is None else stage.matcher(config)
    rounds = TIMING_ROUNDS if stage is None else 2
    best = [math.inf] * len(items)
    with progress.steps("eval: routing the prompts", len(items) * (1 + rounds)) as advance:
        decisions = []
        for item in items:  # and a warm-up
            decisions.append(classify(item.request, config, semantic))
            advance()
        for _ in range(rounds):
            for i, item in enumerate(items):
                start = time.perf_counter_ns()
                classify(item.request, config, semantic)
                best[i] = min(best[i], (time.perf_counter_ns() - start) / 1000)
                advance()
    if stage is not None:
        stage.close()
    return [
        Routed(item, d.tier, d.rule, micros)
        for item, d, micros in zip(items, decisions, best, strict=True)
    ]


# --- scores -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TierScore:
    tier: str
    expected: int  # items labelled with the tier
    routed: int  # items routed to it
    right: int  # both

    @property
    def precision(self) -> float | None:
        return self.right / self.routed if self.routed else None

    @property
    def recall(self) -> float | None:
        return self.right / self.expected if self.expected else None


@dataclass(frozen=True)
class Scores:
    total: int
    right: int
    tiers: list[TierScore]
    confusion: dict[tuple[str, str], int]  # (expected, routed) → items
    classes: dict[str, tuple[int, int]]  # class → (items, right)
    rules: dict[str, tuple[int, int]]  # rule → (fired, right)
    p50_us: float
    p95_us: float

    @property
    def accuracy(self) -> float:
        return self.right / self.total


def score(routed: Sequence[Routed], tiers: Sequence[str]) -> Scores:
    confusion = Counter((r.item.expected, r.tier) for r in routed)
    tier_scores = [
        TierScore(
            t,
            expected=sum(n for (e, _), n in confusion.items() if e == t),
            routed=sum(n for (_, g), n in confusion.items() if g == t),
            right=confusion[(t, t)],
        )
        for t in tiers
    ]
    classes: dict[str, tuple[int, int]] = {}
    rules: dict[str, tuple[int, int]] = {}
    for r in routed:
        n, ok = classes.get(r.item.klass, (0, 0))
        classes[r.item.klass] = (n + 1, ok + r.right)
        n, ok = rules.get(r.rule, (0, 0))
        rules[r.rule] = (n + 1, ok + r.right)
    times = sorted(r.micros for r in routed)
    return Scores(
        total=len(routed),
        right=sum(r.right for r in routed),
        tiers=tier_scores,
        confusion=dict(confusion),
        classes=dict(sorted(classes.items())),
        rules=dict(sorted(rules.items(), key=lambda kv: -kv[1][0])),
        p50_us=statistics.median(times),
        p95_us=times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)],
    )


# --- cost and latency -------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """A tier's figures in the metrics store: p50 latency of successful attempts, mean output
    tokens, and how many attempts they come from."""

    p50_ms: float
    tokens_out: float
    attempts: int


@dataclass(frozen=True)
class TierPrice:
    tier: str
    model: str  # the tier's first model's label
    per_token: tuple[float, float] | None  # input, output USD per token; None: no price known
    observed: Observed | None
    output_tokens: float  # per answer: observed, else the default


def price_per_token(spec: ModelSpec) -> tuple[float, float] | None:
    """USD per input and output token: the config's ``*_cost_per_mtok``, else litellm's map."""
    if spec.input_cost_per_mtok is not None or spec.output_cost_per_mtok is not None:
        return (spec.input_cost_per_mtok or 0.0) / 1e6, (spec.output_cost_per_mtok or 0.0) / 1e6
    entry = litellm_entry(spec.price_as or spec.model) or {}
    inp, out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if isinstance(inp, int | float) and isinstance(out, int | float):
        return float(inp), float(out)
    return None


def tier_prices(
    config: LoadedConfig, observed: dict[str, Observed], output_tokens: float
) -> dict[str, TierPrice]:
    out: dict[str, TierPrice] = {}
    for name in config.tier_names:
        first = config.tier(name).models[0]
        seen = observed.get(name)
        out[name] = TierPrice(
            name,
            first.label,
            price_per_token(first),
            seen,
            seen.tokens_out if seen is not None and seen.tokens_out > 0 else output_tokens,
        )
    return out


def strongest(prices: dict[str, TierPrice]) -> str | None:
    """The tier whose first model costs most per output token (then per input token)."""
    priced = [p for p in prices.values() if p.per_token is not None]
    if not priced:
        return None
    return max(
        priced, key=lambda p: (p.per_token[1], p.per_token[0]) if p.per_token else (0, 0)
    ).tier


@dataclass(frozen=True)
class Comparison:
    """What the routing costs against everything to ``baseline``; None where unknown."""

    baseline: str
    cost_routed: float | None
    cost_baseline: float | None
    p50_routed_ms: float | None
    p50_baseline_ms: float | None
    unpriced: list[str] = field(default_factory=list)  # tiers with no price
    no_latency: list[str] = field(default_factory=list)  # tiers with no traffic in the store

    @property
    def saving(self) -> float | None:
        if self.cost_routed is None or not self.cost_baseline:
            return None
        return 1 - self.cost_routed / self.cost_baseline


def compare(routed: Sequence[Routed], prices: dict[str, TierPrice], baseline: str) -> Comparison:
    def cost(tier: str, request: ChatRequest) -> float | None:
        p = prices[tier]
        if p.per_token is None:
            return None
        return needs(request).prompt_tokens * p.per_token[0] + p.output_tokens * p.per_token[1]

    routed_costs = [cost(r.tier, r.item.request) for r in routed]
    base_costs = [cost(baseline, r.item.request) for r in routed]
    latencies = [prices[r.tier].observed for r in routed]
    base_seen = prices[baseline].observed
    used = {r.tier for r in routed} | {baseline}
    return Comparison(
        baseline=baseline,
        cost_routed=None if None in routed_costs else sum(c or 0.0 for c in routed_costs),
        cost_baseline=None if None in base_costs else sum(c or 0.0 for c in base_costs),
        p50_routed_ms=(
            None
            if any(o is None for o in latencies)
            else statistics.median(o.p50_ms for o in latencies if o is not None)
        ),
        p50_baseline_ms=base_seen.p50_ms if base_seen is not None else None,
        unpriced=sorted(t for t in used if prices[t].per_token is None),
        no_latency=sorted(t for t in used if prices[t].observed is None),
    )


def observed_sql(table: str, hours: float) -> str:
    return (
        "SELECT tier, quantile(0.5)(latency_ms) AS p50_ms, avg(tokens_out) AS tokens_out, "
        f"count() AS attempts FROM {table} WHERE status = 'ok' "
        f"AND ts >= now() - toIntervalSecond({int(hours * 3600)}) GROUP BY tier"
    )


def read_observed(hours: float) -> tuple[dict[str, Observed], str | None]:
    """Each tier's figures from the metrics store, and why there are none, if so."""
    from schemas.topics import EVENTS_TABLE
    from services.metrics.config import MetricsSettings
    from switchboard.analyst import QueryFailed, run_query

    settings = MetricsSettings()
    try:
        columns, rows = run_query(
            observed_sql(f"{settings.clickhouse_database}.{EVENTS_TABLE}", hours), settings
        )
    except QueryFailed as exc:
        return {}, f"the metrics store did not answer ({exc})"
    at = {c: i for i, c in enumerate(columns)}
    return {
        str(r[at["tier"]]): Observed(
            float(r[at["p50_ms"]]), float(r[at["tokens_out"]]), int(r[at["attempts"]])
        )
        for r in rows
    }, None


# --- output -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    data: str
    config: str
    config_hash: str
    hours: float
    scores: Scores
    prices: dict[str, TierPrice]
    comparison: Comparison | None
    store_note: str | None

    def as_dict(self) -> dict[str, Any]:
        s, c = self.scores, self.comparison
        return {
            "data": self.data,
            "config": self.config,
            "config_hash": self.config_hash,
            "prompts": s.total,
            "accuracy": s.accuracy,
            "decision_p50_us": s.p50_us,
            "decision_p95_us": s.p95_us,
            "tiers": {
                t.tier: {
                    "precision": t.precision,
                    "recall": t.recall,
                    "expected": t.expected,
                    "routed": t.routed,
                }
                for t in s.tiers
            },
            "confusion": [
                {"expected": e, "routed": g, "prompts": n} for (e, g), n in s.confusion.items()
            ],
            "classes": {k: {"prompts": n, "right": ok} for k, (n, ok) in s.classes.items()},
            "rules": {k: {"fired": n, "right": ok} for k, (n, ok) in s.rules.items()},
            "comparison": None
            if c is None
            else {
                "baseline": c.baseline,
                "cost_usd": c.cost_routed,
                "baseline_cost_usd": c.cost_baseline,
                "saving": c.saving,
                "p50_ms": c.p50_routed_ms,
                "baseline_p50_ms": c.p50_baseline_ms,
                "unpriced_tiers": c.unpriced,
                "tiers_without_latency": c.no_latency,
            },
            "store": self.store_note,
        }


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def render(report: Report, format_table: progress.TableText = format_table) -> str:
    """The report as text; ``format_table`` draws each table (plain, or rich on a terminal)."""
    s = report.scores
    tiers = [t.tier for t in s.tiers]
    out = [
        f"{report.data}: {s.total} prompts, routed by {report.config} (hash {report.config_hash})",
        f"accuracy {_pct(s.accuracy)} ({s.right}/{s.total}); one decision takes "
        f"{s.p50_us:.0f} µs p50, {s.p95_us:.0f} µs p95",
        "",
    ]
    out.append(
        format_table(
            ["tier", "precision", "recall", "expected", "routed"],
            [[t.tier, _pct(t.precision), _pct(t.recall), t.expected, t.routed] for t in s.tiers],
        )
    )
    out += ["", "confusion (rows: expected tier, columns: routed tier)"]
    out.append(
        format_table(
            ["expected", *tiers], [[e, *(s.confusion.get((e, g), 0) for g in tiers)] for e in tiers]
        )
    )
    out += [""]
    out.append(
        format_table(
            ["class", "prompts", "accuracy"],
            [[k, n, _pct(ok / n)] for k, (n, ok) in s.classes.items()],
        )
    )
    out += [""]
    out.append(
        format_table(
            ["rule fired", "prompts", "right"],
            [[k, n, _pct(ok / n)] for k, (n, ok) in s.rules.items()],
        )
    )
    out += ["", *_render_cost(report)]
    return "\n".join(out)


def _render_cost(report: Report) -> list[str]:
    c = report.comparison
    if c is None:
        return ["cost: no tier of the config has a known price"]
    lines = [
        f"cost and latency, routed vs everything to {c.baseline!r} (prices from the config; "
        f"p50 latency and output tokens per answer from the metrics store, last {report.hours:g} h)"
    ]
    for p in report.prices.values():
        seen = (
            f"p50 {p.observed.p50_ms:.0f} ms, {p.observed.tokens_out:.0f} tokens out "
            f"({p.observed.attempts} attempts)"
            if p.observed is not None
            else f"no traffic in the store: {p.output_tokens:g} tokens out assumed"
        )
        price = (
            f"${p.per_token[0] * 1e6:g} / ${p.per_token[1] * 1e6:g} per M tokens in/out"
            if p.per_token is not None
            else "no price"
        )
        lines.append(f"  {p.tier}: {p.model}, {price}; {seen}")
    if c.cost_routed is not None and c.cost_baseline is not None:
        lines.append(
            f"  cost: ${c.cost_routed:.4f} routed vs ${c.cost_baseline:.4f} "
            f"({_pct(c.saving)} saved)"
        )
    else:
        lines.append(f"  cost: unknown (no price for tier {', '.join(c.unpriced)})")
    if c.p50_routed_ms is not None and c.p50_baseline_ms is not None:
        lines.append(
            f"  p50 latency: {c.p50_routed_ms:.0f} ms routed vs {c.p50_baseline_ms:.0f} ms"
        )
    else:
        why = report.store_note or f"no traffic for tier {', '.join(c.no_latency)}"
        lines.append(f"  p50 latency: unknown ({why})")
    return lines


def evaluate(
    data: Path,
    config: LoadedConfig,
    hours: float = 24.0,
    output_tokens: float = DEFAULT_OUTPUT_TOKENS,
    observed: tuple[dict[str, Observed], str | None] | None = None,
    baseline: str | None = None,
) -> Report:
    if baseline is not None and baseline not in config.tier_names:
        raise DataError(
            f"--baseline {baseline!r} is not a tier of the config ({', '.join(config.tier_names)})"
        )
    items = load_items(data, config.tier_names)
    routed = route_all(items, config)
    scores = score(routed, config.tier_names)
    seen, note = observed if observed is not None else read_observed(hours)
    prices = tier_prices(config, seen, output_tokens)
    base = baseline or strongest(prices)
    return Report(
        data=str(data),
        config=str(config.path),
        config_hash=config.hash,
        hours=hours,
        scores=scores,
        prices=prices,
        comparison=compare(routed, prices, base) if base is not None else None,
        store_note=note,
    )


def eval_command(
    data: str,
    config_path: str | None,
    fmt: str = "table",
    hours: float = 24.0,
    output_tokens: float = DEFAULT_OUTPUT_TOKENS,
    min_accuracy: float | None = None,
    baseline: str | None = None,
) -> int:
    from services.common.routing_config import ConfigError, load_config
    from services.common.settings import CommonSettings
    from services.router.adapters.embedder import EncoderUnavailable

    bad = [
        f"{name} {value:g}: {why}"
        for name, value, wrong, why in (
            ("--hours", hours, hours <= 0, "must be above 0"),
            ("--output-tokens", output_tokens, output_tokens < 0, "must be 0 or more"),
            (
                "--min-accuracy",
                min_accuracy or 0.0,
                min_accuracy is not None and not 0 <= min_accuracy <= 1,
                "is a share, from 0 to 1",
            ),
        )
        if wrong
    ]
    if bad:
        print(f"eval: {'; '.join(bad)}", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path or CommonSettings().config)
        report = evaluate(Path(data), config, hours, output_tokens, baseline=baseline)
    except (ConfigError, DataError, EncoderUnavailable) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    if fmt == "json":
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(render(report, progress.table_text(format_table)))
    if min_accuracy is not None and report.scores.accuracy < min_accuracy:
        print(
            f"eval: accuracy {_pct(report.scores.accuracy)} is below {_pct(min_accuracy)}",
            file=sys.stderr,
        )
        return 1
    return 0
