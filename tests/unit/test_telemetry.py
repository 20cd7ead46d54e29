"""The series in services/common/telemetry.py: named and labelled as documented, every one of
them in docs/metrics.md; and the status each outcome is counted under."""

from __future__ import annotations

import re

import pytest
from prometheus_client import Counter
from prometheus_client.metrics import MetricWrapperBase

from schemas.v1 import ChatError, ChatResult
from services.common import telemetry
from services.router.request_metrics import Note, status_of
from services.workers.service import finished
from tests.conftest import ROOT

DOC = (ROOT / "docs" / "metrics.md").read_text()


def defined() -> dict[str, tuple[str, ...]]:
    """Every series telemetry.py defines (a counter's name with ``_total``) → its labels."""
    series = {}
    for metric in vars(telemetry).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if isinstance(metric, Counter) else "")
            series[name] = tuple(metric._labelnames)
    series[telemetry.LAG_NAME] = ("group", "topic", "partition")
    return series


def documented() -> dict[str, tuple[str, ...]]:
    """The series docs/metrics.md has a heading for (``### `name{a, b}` ``) → the labels it names."""
    found = {}
    for name, labels in re.findall(r"^#+ `(switchboard_\w+)(?:\{([^}`]*)\})?`$", DOC, re.M):
        found[name] = tuple(x.strip() for x in labels.split(",")) if labels else ()
    return found


def test_the_brief_series_are_all_defined() -> None:
    """Names and labels that dashboards and the KEDA doc are written against."""
    assert defined() == {
        "switchboard_router_requests_total": ("tier", "status"),
        "switchboard_router_request_duration_seconds": ("tier", "status"),
        "switchboard_router_decision_duration_seconds": (),
        "switchboard_worker_requests_total": ("tier", "status"),
        "switchboard_model_call_duration_seconds": ("tier", "model", "status"),
        "switchboard_model_ttft_seconds": ("tier", "model"),
        "switchboard_worker_in_flight": ("tier",),
        "switchboard_retries_total": ("tier", "model"),
        "switchboard_fallbacks_total": ("tier",),
        "switchboard_tokens_total": ("tier", "model", "direction"),
        "switchboard_cost_usd_total": ("tier", "model"),
        "switchboard_dead_letters_total": ("service", "topic"),
        "switchboard_answers_dropped_total": ("tier",),
        "switchboard_kafka_consumer_lag": ("group", "topic", "partition"),
        "switchboard_redis_errors_total": ("service", "operation"),
        "switchboard_clickhouse_errors_total": ("operation",),
        "switchboard_events_written_total": (),
        "switchboard_clickhouse_insert_duration_seconds": (),
    }


@pytest.mark.parametrize("name", sorted(defined()))
def test_every_series_is_prefixed_and_documented_with_its_labels(name: str) -> None:
    assert name.startswith("switchboard_")
    labels = defined()[name]
    assert set(labels) <= set(telemetry.LABELS), f"{name}: a label LABELS does not explain"
    assert documented().get(name) == labels, f"docs/metrics.md: no heading `{name}{{...}}`"


def test_the_doc_names_no_series_that_is_not_defined() -> None:
    assert set(documented()) == set(defined())


def test_the_doc_explains_every_label() -> None:
    for label in telemetry.LABELS:
        assert f"| `{label}` |" in DOC, f"docs/metrics.md: label `{label}` is not in its table"


def test_every_series_has_help_text() -> None:
    for metric in vars(telemetry).values():
        if isinstance(metric, MetricWrapperBase):
            assert len(metric._documentation) > 20, metric._name


@pytest.mark.parametrize(
    ("code", "note", "status"),
    [
        (200, Note(tier="fast"), "ok"),
        (400, Note(), "rejected"),  # bad input, unknown model
        (401, Note(), "rejected"),
        (413, Note(), "rejected"),
        (422, Note(), "rejected"),  # an Idempotency-Key reused by the router's own check
        (422, Note(upstream=True), "error"),  # ... or by the worker's
        (429, Note(upstream=True), "error"),
        (502, Note(upstream=True), "error"),
        (400, Note(upstream=True), "error"),  # the provider refused it
        (504, Note(), "timeout"),
        (504, Note(upstream=True), "timeout"),
        (503, Note(), "unavailable"),
        (500, Note(), "error"),
        (499, Note(), "cancelled"),
        (None, Note(), "error"),  # no answer at all
        (200, Note(status="timeout"), "timeout"),  # a stream cut by its deadline
        (200, Note(status="cancelled"), "cancelled"),  # its client left mid-stream
    ],
)
def test_router_status_of_an_http_answer(code: int | None, note: Note, status: str) -> None:
    assert status_of(code, note) == status


def _error(code: str) -> ChatError:
    return ChatError(request_id="r", code=code, message="m")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("deadline_exceeded", "timeout"),
        ("cancelled", "cancelled"),
        ("model_not_found", "rejected"),
        ("unsupported_parameter", "rejected"),
        ("unsupported_capability", "rejected"),
        ("all_models_failed", "error"),
        ("rate_limited", "error"),
        ("stream_cut_off", "error"),
    ],
)
def test_worker_status_of_an_error(code: str, status: str) -> None:
    assert finished(_error(code)) == status


def test_worker_status_of_an_answer() -> None:
    result = ChatResult.model_validate(
        {
            "request_id": "r",
            "tier": "fast",
            "model": "m",
            "provider": "p",
            "rule": "default",
            "config_hash": "h",
            "attempts": 1,
            "latency_ms": 1.0,
            "completion": {},
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            "cost_usd": 0.0,
        }
    )
    assert finished(result) == "ok"


def test_a_tier_counts_calls_on_cached_children() -> None:
    tier = telemetry.TierMetrics("unit-tier")
    tier.call("unit-model", "ok", 0.5, ttft_s=0.1, tokens_in=3, tokens_out=4, cost_usd=0.01)
    tier.call("unit-model", "error", 0.2, retry=True)
    tier.finished("ok")
    sample = telemetry.MODEL_CALL_DURATION.labels("unit-tier", "unit-model", "ok")
    assert sample._sum.get() == 0.5  # the same child the cache holds
    assert telemetry.TOKENS.labels("unit-tier", "unit-model", "out")._value.get() == 4
    assert telemetry.RETRIES.labels("unit-tier", "unit-model")._value.get() == 1
    assert telemetry.WORKER_REQUESTS.labels("unit-tier", "ok")._value.get() == 1
