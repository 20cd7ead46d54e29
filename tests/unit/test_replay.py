"""`switchboard replay`'s arguments and the report's regression flags (switchboard/replay.py,
services/metrics/domain/replay_report.py). The run itself: tests/integration/test_replay.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.common.routing_config import load_config
from services.metrics.domain.replay_report import SliceRow, slice_rows
from switchboard.replay import BadArguments, parse_when, read_ids, resolve_against

NOW = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
CONFIG = """
tiers:
  fast:
    models: [{model: openai/sim-light, name: sim-light, aliases: [light]}]
default: fast
experiments:
  next:
    tier: fast
    mode: canary
    candidate: {model: openai/sim-balanced-next, name: sim-balanced-next}
    criteria: ["error_rate <= baseline.error_rate"]
"""


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("90s", NOW - timedelta(seconds=90)),
        ("30m", NOW - timedelta(minutes=30)),
        ("1.5h", NOW - timedelta(hours=1.5)),
        ("2d", NOW - timedelta(days=2)),
        ("2026-12-02T08:00", datetime(2026, 12, 2, 8, 0, tzinfo=UTC)),
        ("2026-12-02T08:00+01:00", datetime(2026, 12, 2, 7, 0, tzinfo=UTC)),
    ],
)
def test_times_and_ages(text: str, when: datetime) -> None:
    assert parse_when(text, NOW) == when


def test_a_time_that_is_neither_is_named() -> None:
    with pytest.raises(BadArguments, match="'yesterday' is neither"):
        parse_when("yesterday", NOW)


def test_request_ids_one_per_line(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("a\n\n b \na\n")
    assert read_ids(path) == ["a", "b"]
    path.write_text("\n")
    with pytest.raises(BadArguments, match="no request id"):
        read_ids(path)
    with pytest.raises(BadArguments, match=r"nosuch\.txt"):
        read_ids(tmp_path / "nosuch.txt")


def test_against_a_file_a_tier_or_a_model(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(CONFIG)
    config = load_config(path)
    assert resolve_against(str(path), config).kind == "config"
    assert resolve_against("fast", config).kind == "tier"
    for model in ("sim-light", "light", "openai/sim-light", "sim-balanced-next"):
        assert resolve_against(model, config).kind == "model", model
    with pytest.raises(BadArguments) as refused:
        resolve_against("gpt-9", config)
    assert "fast" in str(refused.value) and "sim-balanced-next" in str(refused.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("tiers: {}\n")
    with pytest.raises(BadArguments, match=r"broken\.yaml"):
        resolve_against(str(broken), config)


def row(**changes: Any) -> SliceRow:
    values = {
        "slice": "all", "requests": 20, "compared": 20, "dropped": 0,
        "base_p50_ms": 100.0, "base_p95_ms": 200.0, "cand_p50_ms": 110.0, "cand_p95_ms": 250.0,
        "base_error_rate": 0.0, "cand_error_rate": 0.0,
        "base_cost_per_1k": 0.001, "cand_cost_per_1k": 0.0011,
        "agreement": 0.1, "similarity": 0.8,
    }  # fmt: skip
    return SliceRow({**values, **changes})


def test_a_candidate_as_good_is_not_flagged() -> None:
    assert row().flags() == []


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"cand_p95_ms": 301.0}, "slower: p95 301 ms vs 200 ms"),
        ({"cand_error_rate": 0.1}, "fails more: 10% vs 0%"),
        ({"cand_cost_per_1k": 0.0013}, "costlier"),
        ({"similarity": 0.3}, "answers differ: similarity 0.30"),
    ],
)
def test_each_regression_is_flagged(changes: dict[str, Any], flag: str) -> None:
    flags = row(**changes).flags()
    assert len(flags) == 1 and flags[0].startswith(flag), flags


def test_too_few_requests_are_not_judged_and_unknowns_are_not_regressions() -> None:
    assert row(compared=4, cand_p95_ms=1000.0).flags() == []
    assert row(similarity=None, base_p95_ms=None, base_cost_per_1k=None).flags() == []


def test_rows_come_all_first_then_in_slice_order() -> None:
    columns = ["slice", "requests"]
    rows = [["noisy or truncated", 1], ["short", 3], ["all", 4], ["long conversation", 1]]
    assert [r.name for r in slice_rows(columns, rows)] == [
        "all", "short", "long conversation", "noisy or truncated",
    ]  # fmt: skip
