"""``switchboard report`` on an hour of known traffic: the matrix in every format, and the HTML
page opened in headless Chromium (Debian's package; `make test` installs it), screenshotted,
with every chart drawn and carrying the series it should."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from services.metrics.domain.report import MATRIX_COLUMNS
from services.metrics.domain.report_html import CHARTS
from tests.e2e.report_data import CALLS, DECISIONS, MODELS

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What each chart must show: legend entries (plotly draws one per named series).
SERIES = {
    "latency-cdf": set(MODELS),
    "over-time": set(MODELS),
    "cost": {"USD per 1k tokens"},
    "window-use": set(MODELS),
    "canary": {"fast: candidate's share of requests", "decisions (share set to)"},
}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("report-page")
    subprocess.run(
        [sys.executable, "-m", "tests.e2e.report_data", str(where)],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    return where


def report(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SWITCHBOARD_DATA_DIR": str(data_dir)}
    env.pop("SWITCHBOARD_CLICKHOUSE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "report", "--since", "2h", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_matrix_in_every_format(data_dir: Path) -> None:
    rows = json.loads(report(data_dir, "--format", "json").stdout)
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == set(MODELS)
    for model, (tier, variant, *_) in MODELS.items():
        row = by_model[model]
        assert (row["tier"], row["variant"], row["config_hash"]) == (tier, variant, "cfg-1")
        assert row["requests"] == row["attempts"] == CALLS
        assert row["noisy_attempts"] == CALLS // 10 and row["noisy_error_rate"] is not None
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert 0 < row["window_use_p50"] <= row["window_use_p95"] <= row["window_use_max"] < 1
        assert row["usd_per_1k_tokens"] > 0
        assert (row["fallback_rate"], row["escalation_rate"]) == (0, 0)
        if tier == "fast":
            assert 0 < row["ttft_p50_ms"] < row["p50_ms"]  # 0.3 of a streamed call's time
            assert row["notes"] == ""
        else:  # nothing streamed: blank, and the row says why
            assert [row[f"ttft_{p}_ms"] for p in ("p50", "p95", "p99")] == [None] * 3
            assert row["notes"] == "ttft: no streamed call succeeded"
    # the candidate is cheaper per token than the baseline, as the data says
    assert (
        by_model["sim-light-next"]["usd_per_1k_tokens"] < by_model["sim-light"]["usd_per_1k_tokens"]
    )

    table = report(data_dir).stdout
    assert "sim-reasoning" in table and "nan" not in table.lower()
    parsed = list(csv.reader(io.StringIO(report(data_dir, "--format", "csv").stdout)))
    assert tuple(parsed[0]) == MATRIX_COLUMNS and len(parsed) == 1 + len(MODELS)
    assert not any("nan" in cell.lower() for row in parsed for cell in row)


def test_filters(data_dir: Path) -> None:
    """A tenant that sent nothing, and a range before the traffic: an empty matrix, not an
    error; and a range the raw rows do not cover is answered from the per-minute aggregate."""
    assert json.loads(report(data_dir, "--format", "json", "--tenant", "nobody").stdout) == []
    assert "(0 rows)" in report(data_dir, "--since", "3h", "--until", "2h").stdout
    week = report(data_dir, "--since", "8d")
    assert "from aggregate" in week.stdout and "sim-reasoning" in week.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "report", "--since", "8d", "--tenant", "a"],
        cwd=ROOT,
        env={**os.environ, "SWITCHBOARD_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "llm_events keeps 7 days" in refused.stderr


class _Charts(HTMLParser):
    """Per chart div: whether plotly drew its svg, and the legend texts inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.dom = ""
        self.drawn: dict[str, bool] = {}
        self.legends: dict[str, set[str]] = {}
        self._chart: str | None = None
        self._depth = 0
        self._legend = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        at = dict(attrs)
        if tag == "div" and (at.get("id") or "").startswith("chart-"):
            self._chart, self._depth = (at["id"] or "")[len("chart-") :], 0
            self.drawn.setdefault(self._chart, False)
            self.legends.setdefault(self._chart, set())
        if self._chart is None:
            return
        if tag == "div":
            self._depth += 1
        classes = (at.get("class") or "").split()
        if tag == "svg" and "main-svg" in classes:
            self.drawn[self._chart] = True
        self._legend = tag == "text" and "legendtext" in classes

    def handle_endtag(self, tag: str) -> None:
        if self._chart is not None and tag == "div":
            self._depth -= 1
            if self._depth == 0:
                self._chart = None
        self._legend = False

    def handle_data(self, data: str) -> None:
        if self._chart is not None and self._legend:
            self.legends[self._chart].add(data)


def chromium(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs Debian's chromium"
    profile = page.parent / "chromium-profile"
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # nothing may come from the network: every request goes to a closed port
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            "--window-size=1400,3400",
            "--virtual-time-budget=15000",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )


def rendered_charts(page: Path) -> _Charts:
    """What Chromium drew of ``page``: each chart's svg and legend texts, and the DOM."""
    charts = _Charts()
    charts.dom = chromium(page, "--dump-dom").stdout
    charts.feed(charts.dom)
    return charts


def test_page_renders_every_chart(data_dir: Path) -> None:
    page = data_dir / "report.html"
    report(data_dir, "--format", "html", "-o", str(page))
    text = page.read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)  # self-contained

    charts = rendered_charts(page)
    dom = charts.dom
    assert set(charts.drawn) == set(CHARTS)
    for name in CHARTS:
        assert charts.drawn[name], f"{name}: no plot drawn"
        assert SERIES[name] <= charts.legends[name], (name, charts.legends[name])
    # the canary's decisions are on its chart, each with its action as the marker's label
    canary = dom[dom.index('id="chart-canary"') :]
    for _, action, _, _ in DECISIONS:
        assert f">{action}<" in canary

    shot = data_dir / "report.png"
    chromium(page, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
