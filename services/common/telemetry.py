"""Every Prometheus series Switchboard exposes, defined here and nowhere else (docs/metrics.md).

One registry per process: prometheus_client's default ``REGISTRY``, which also carries its
``process_*`` and ``python_*`` series. Each service serves it on ``GET /metrics``
(``services/common/runtime.py``).

Label values stay bounded: tier names and model labels from the routing config, topic and group
names, and the status enums below; never a request id or free text. The code paths that count
(router per request, worker per model call) take the labelled children from small caches
(``_Children``), so an event costs a dict lookup and an increment, with no I/O and no lock of ours.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

# What each label holds; docs/metrics.md says the same for operators (a unit test compares them).
LABELS: dict[str, str] = {
    "tier": "a tier name of the routing config ('' when the router decided none)",
    "status": "the outcome, one of the status values of the series (docs/metrics.md)",
    "model": "a model's label in the routing config (its `name`)",
    "direction": "in (prompt tokens) or out (completion tokens)",
    "service": "router, worker, metrics or shadow",
    "topic": "a Kafka topic name",
    "group": "a Kafka consumer group",
    "partition": "a partition number",
    "operation": "the call that failed (names listed per series in docs/metrics.md)",
}

RouterStatus = Literal["routed", "ok", "rejected", "error", "timeout", "unavailable", "cancelled"]
WorkerStatus = Literal[
    "ok", "error", "timeout", "cancelled", "rejected", "rerouted", "replayed", "duplicate"
]

# --- router -------------------------------------------------------------------------------------
ROUTER_REQUESTS = Counter(
    "switchboard_router_requests_total",
    "Requests the router handled (HTTP chat completions and Kafka ingress), by tier and status.",
    ["tier", "status"],
)
ROUTER_REQUEST_DURATION = Histogram(
    "switchboard_router_request_duration_seconds",
    "End-to-end time of an HTTP chat completion, from accepting it to the end of its answer.",
    ["tier", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
DECISION_DURATION = Histogram(
    "switchboard_router_decision_duration_seconds",
    "Time to classify one request: the rules and, when configured, the semantic stage.",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1),
)

# --- workers ------------------------------------------------------------------------------------
WORKER_REQUESTS = Counter(
    "switchboard_worker_requests_total",
    "Routed requests a worker finished, by final status.",
    ["tier", "status"],
)
MODEL_CALL_DURATION = Histogram(
    "switchboard_model_call_duration_seconds",
    "Duration of each model call (attempt), by its status.",
    ["tier", "model", "status"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
MODEL_TTFT = Histogram(
    "switchboard_model_ttft_seconds",
    "Time to the first token of model calls that produced one.",
    ["tier", "model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
WORKER_IN_FLIGHT = Gauge(
    "switchboard_worker_in_flight",
    "Model calls in flight.",
    ["tier"],
)
RETRIES = Counter(
    "switchboard_retries_total",
    "Model calls that retried the same model after a transient failure.",
    ["tier", "model"],
)
FALLBACKS = Counter(
    "switchboard_fallbacks_total",
    "Requests moved to another model of the tier, or to the fallback tier, after a failure.",
    ["tier"],
)
TOKENS = Counter(
    "switchboard_tokens_total",
    "Tokens of model calls, prompt (in) and completion (out).",
    ["tier", "model", "direction"],
)
COST = Counter(
    "switchboard_cost_usd_total",
    "What model calls cost, in US dollars (litellm's price map).",
    ["tier", "model"],
)

# --- every service ------------------------------------------------------------------------------
DEAD_LETTERS = Counter(
    "switchboard_dead_letters_total",
    "Dead letters published, by the service that wrote them and the topic the message came from.",
    ["service", "topic"],
)
ANSWERS_DROPPED = Counter(
    "switchboard_answers_dropped_total",
    "Answers a worker dropped because the reply topic of the router that took the request no "
    "longer exists (that router and its caller are gone).",
    ["tier"],
)
REDIS_ERRORS = Counter(
    "switchboard_redis_errors_total",
    "Redis calls that raised (the worker then fails open).",
    ["service", "operation"],
)

# --- metrics service ----------------------------------------------------------------------------
CLICKHOUSE_ERRORS = Counter(
    "switchboard_clickhouse_errors_total",
    "ClickHouse calls that failed: insert, lookup (rows read again after a crash) or query.",
    ["operation"],
)
EVENTS_WRITTEN = Counter(
    "switchboard_events_written_total",
    "Attempt events inserted into llm_events.",
)
CLICKHOUSE_INSERT_DURATION = Histogram(
    "switchboard_clickhouse_insert_duration_seconds",
    "Duration of each ClickHouse insert that succeeded (events and record tables).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class _Children:
    """``metric.labels(*values)``, made once per label values (the values are bounded)."""

    def __init__(self, metric: MetricWrapperBase) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


_router_requests = _Children(ROUTER_REQUESTS)
_router_durations = _Children(ROUTER_REQUEST_DURATION)
_dead_letters = _Children(DEAD_LETTERS)
_redis_errors = _Children(REDIS_ERRORS)
_clickhouse_errors = _Children(CLICKHOUSE_ERRORS)


def router_answered(tier: str, status: RouterStatus, seconds: float) -> None:
    """An HTTP chat completion ended (``services/router/request_metrics.py``)."""
    _router_requests(tier, status).inc()
    _router_durations(tier, status).observe(seconds)


def router_handled(counts: Mapping[tuple[str, RouterStatus], int]) -> None:
    """Kafka ingress requests, by (tier, status), once their batch is published."""
    for (tier, status), n in counts.items():
        _router_requests(tier, status).inc(n)


def decided(seconds: float) -> None:
    DECISION_DURATION.observe(seconds)


def dead_lettered(service: str, topic: str, n: int = 1) -> None:
    """``n`` dead letters of messages from ``topic`` were published by ``service``."""
    _dead_letters(service, topic).inc(n)


def answer_dropped(tier: str) -> None:
    ANSWERS_DROPPED.labels(tier).inc()


def redis_failed(service: str, operation: str) -> None:
    _redis_errors(service, operation).inc()


def clickhouse_failed(operation: str) -> None:
    _clickhouse_errors(operation).inc()


class _ModelChildren:
    __slots__ = ("cost", "retries", "tokens_in", "tokens_out", "ttft")

    def __init__(self, tier: str, model: str) -> None:
        self.ttft = MODEL_TTFT.labels(tier, model)
        self.retries = RETRIES.labels(tier, model)
        self.tokens_in = TOKENS.labels(tier, model, "in")
        self.tokens_out = TOKENS.labels(tier, model, "out")
        self.cost = COST.labels(tier, model)


class TierMetrics:
    """The series of one tier's worker, with their children cached by model and status."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.in_flight = WORKER_IN_FLIGHT.labels(tier)
        self.fallbacks = FALLBACKS.labels(tier)
        self._requests: dict[str, Any] = {}
        self._calls: dict[tuple[str, str], Any] = {}
        self._models: dict[str, _ModelChildren] = {}

    def finished(self, status: WorkerStatus) -> None:
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = WORKER_REQUESTS.labels(self.tier, status)
        child.inc()

    def call(
        self,
        model: str,
        status: str,
        seconds: float,
        *,
        ttft_s: float | None = None,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost_usd: float = 0.0,
        retry: bool = False,
    ) -> None:
        """One model call (attempt) ended with ``status`` (an ``AttemptStatus``)."""
        duration = self._calls.get((model, status))
        if duration is None:
            duration = self._calls[(model, status)] = MODEL_CALL_DURATION.labels(
                self.tier, model, status
            )
        duration.observe(seconds)
        children = self._models.get(model)
        if children is None:
            children = self._models[model] = _ModelChildren(self.tier, model)
        if ttft_s is not None:
            children.ttft.observe(ttft_s)
        if retry:
            children.retries.inc()
        if tokens_in:
            children.tokens_in.inc(tokens_in)
        if tokens_out:
            children.tokens_out.inc(tokens_out)
        if cost_usd > 0:
            children.cost.inc(cost_usd)


# --- consumer lag -------------------------------------------------------------------------------
LAG_NAME = "switchboard_kafka_consumer_lag"
LAG_HELP = (
    "Records of an assigned partition not yet committed by its consumer group: the highwater its "
    "last fetch saw, less the group's commit point (or fetch position before the first commit)."
)


class LagSource(Protocol):
    def lags(self) -> Iterable[tuple[str, int, int]]:
        """(topic, partition, lag) of each assigned partition whose lag is known."""
        ...


class ConsumerLag:
    """A collector: the lag of every partition the consumers of this process hold, computed
    when scraped. Consumers register while they run (``watch_lag``)."""

    def __init__(self) -> None:
        self._sources: weakref.WeakKeyDictionary[LagSource, str] = weakref.WeakKeyDictionary()

    def watch(self, group: str, source: LagSource) -> None:
        self._sources[source] = group

    def forget(self, source: LagSource) -> None:
        self._sources.pop(source, None)

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(LAG_NAME, LAG_HELP, labels=["group", "topic", "partition"])]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(LAG_NAME, LAG_HELP, labels=["group", "topic", "partition"])
        seen: set[tuple[str, str, str]] = set()
        for source, group in list(self._sources.items()):
            for topic, partition, lag in source.lags():
                key = (group, topic, str(partition))
                if key not in seen:  # two members of a group in one process, mid-rebalance
                    seen.add(key)
                    family.add_metric(list(key), lag)
        yield family


CONSUMER_LAG = ConsumerLag()
REGISTRY.register(CONSUMER_LAG)  # type: ignore[arg-type]


def watch_lag(group: str, source: LagSource) -> None:
    CONSUMER_LAG.watch(group, source)


def forget_lag(source: LagSource) -> None:
    CONSUMER_LAG.forget(source)
