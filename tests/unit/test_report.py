"""The report's pure parts: time ranges, which table answers, blank figures, the page."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from services.metrics.domain import report
from services.metrics.domain.report import ReportError, Window, choose_source, parse_when
from services.metrics.domain.report_html import CHARTS, render

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("24h", NOW - timedelta(hours=24)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("7d", NOW - timedelta(days=7)),
        ("2w", NOW - timedelta(days=14)),
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12-01T09:30", datetime(2026, 12, 1, 9, 30, tzinfo=UTC)),
        ("2026-12-01T09:30+01:00", datetime(2026, 12, 1, 8, 30, tzinfo=UTC)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "-3h", "h", "2026-13-01"])
def test_parse_when_refuses(text: str) -> None:
    with pytest.raises(ReportError, match="duration"):
        parse_when(text, NOW)


def test_until_after_since() -> None:
    with pytest.raises(ReportError, match="not after"):
        Window(NOW, NOW - timedelta(hours=1))


@pytest.mark.parametrize(
    ("hours", "tenant", "asked", "expected"),
    [
        (1, None, "auto", "events"),
        (24, None, "auto", "events"),
        (25, None, "auto", "aggregate"),
        (25, "acme", "auto", "events"),
        (1, None, "aggregate", "aggregate"),
        (100, None, "events", "events"),
        (24 * 10, None, "auto", "aggregate"),
    ],
)
def test_choose_source(hours: float, tenant: str | None, asked: str, expected: str) -> None:
    assert choose_source(Window.last(hours, tenant, NOW), asked, NOW) == expected


@pytest.mark.parametrize(
    ("hours", "tenant", "asked", "why"),
    [
        (24 * 8, None, "events", "keeps 7 days"),
        (24 * 8, "acme", "auto", "only llm_events"),
        (1, "acme", "aggregate", "keeps no tenant"),
        (1, None, "fastest", "not auto, events or aggregate"),
    ],
)
def test_choose_source_refuses(hours: float, tenant: str | None, asked: str, why: str) -> None:
    with pytest.raises(ReportError, match=why):
        choose_source(Window.last(hours, tenant, NOW), asked, NOW)


def test_steps_fit_the_range() -> None:
    assert report.step_s(Window.last(0.25, now=NOW), "events") == 10
    assert report.step_s(Window.last(0.25, now=NOW), "aggregate") == 60
    assert report.step_s(Window.last(24, now=NOW), "events") == 900
    assert report.step_s(Window.last(24 * 7, now=NOW), "aggregate") == 3 * 3600


def _raw(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "tier": "fast",
        "model": "m",
        "variant": "",
        "config_hash": "h",
        "n_requests": 10,
        "n_attempts": 12,
        "n_errors": 2,
        "n_ok": 10,
        "n_streamed": 4,
        "n_windowed": 12,
        "n_noisy": 3,
        "n_noisy_errors": 1,
        "latency_q": [100.0, 200.0, 300.0],
        "ttft_q": [10.0, 20.0, 30.0],
        "n_in": 1000,
        "n_out": 1000,
        "cost": 0.02,
        "use_q": [0.1, 0.2],
        "use_max": 0.5,
        "n_fallbacks": 1,
        "n_escalations": 0,
    }
    return row | changes


def _rows(*raws: dict[str, object]) -> list[dict[str, object]]:
    columns = list(raws[0])
    return report.matrix_rows(columns, [[r[c] for c in columns] for r in raws])


def test_matrix_row_figures() -> None:
    (row,) = _rows(_raw())
    assert (row["error_rate"], row["noisy_error_rate"]) == (round(2 / 12, 4), round(1 / 3, 4))
    assert (row["p95_ms"], row["ttft_p99_ms"], row["usd_per_1k_tokens"]) == (200.0, 30.0, 0.01)
    assert (row["window_use_p50"], row["window_use_max"], row["fallback_rate"]) == (0.1, 0.5, 0.1)
    assert row["notes"] == ""
    assert tuple(row) == report.MATRIX_COLUMNS


def test_blank_figures_say_why() -> None:
    """Whatever the engine answers for an empty quantile (0, nan), the counts decide."""
    nan = float("nan")
    (row,) = _rows(
        _raw(
            n_ok=0,
            n_streamed=0,
            n_windowed=0,
            n_noisy=0,
            n_noisy_errors=0,
            n_in=0,
            n_out=0,
            latency_q=[0.0, 0.0, 0.0],
            ttft_q=[nan, nan, nan],
            use_q=[0.0, 0.0],
            use_max=0.0,
        )
    )
    blank = [c for c, v in row.items() if v is None]
    assert blank == [
        "noisy_error_rate",
        *("p50_ms", "p95_ms", "p99_ms", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms"),
        "usd_per_1k_tokens",
        *("window_use_p50", "window_use_p95", "window_use_max"),
    ]
    assert row["notes"] == (
        "latency: no successful call; ttft: no streamed call succeeded; noisy: no noisy input; "
        "cost/1k: no tokens counted; window: context window unknown"
    )


def test_page_says_what_it_cannot_draw() -> None:
    """No traffic: every chart's place says why it is empty; nothing reads nan."""
    empty = report.assemble(
        Window.last(1, now=NOW),
        "events",
        {name: ([], []) for name in report.queries("db", Window.last(1, now=NOW), "events", True)},
    )
    page = render(empty, NOW)
    for name in CHARTS:
        assert f'<div class="chart empty" id="chart-{name}">' in page
    body = re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # plotly.js says nan itself
    assert "No model calls in this range." in body and "nan" not in body.lower()
