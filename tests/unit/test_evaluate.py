"""``switchboard eval``: labelled prompts in, the router's scores, cost and latency out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.decisions import rules_only
from services.common.routing_config import LoadedConfig, load_config
from switchboard import evaluate as ev
from switchboard.cli import main

ROOT = Path(__file__).resolve().parents[2]
LONG = "Please summarise this report. " + "The quarter went well overall. " * 20


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> LoadedConfig:
    return load_config(rules_only(tmp_path_factory.mktemp("config")))


def _write(tmp_path: Path, lines: list[Any]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    return path


ITEMS = [
    {"id": "a", "class": "chit_chat", "expected_tier": "fast", "prompt": "hi there"},
    {"id": "b", "class": "writing", "expected_tier": "balanced", "prompt": LONG},
    {"id": "c", "class": "maths", "expected_tier": "reasoning", "prompt": "what is 2 + 2?"},
    {
        "id": "d",
        "class": "multimodal",
        "expected_tier": "vision",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            }
        ],
    },
]


def _observed() -> tuple[dict[str, ev.Observed], str | None]:
    return {
        "fast": ev.Observed(p50_ms=100.0, tokens_out=50.0, attempts=10),
        "balanced": ev.Observed(p50_ms=400.0, tokens_out=200.0, attempts=10),
        "reasoning": ev.Observed(p50_ms=3000.0, tokens_out=1000.0, attempts=10),
        "vision": ev.Observed(p50_ms=800.0, tokens_out=100.0, attempts=10),
    }, None


def test_scores_count_what_the_config_routes(tmp_path: Path, config: LoadedConfig) -> None:
    report = ev.evaluate(_write(tmp_path, ITEMS), config, observed=_observed())
    s = report.scores
    # "what is 2 + 2?" is short: the shipped rules send it to fast, not reasoning
    assert (s.total, s.right) == (4, 3)
    by_tier = {t.tier: t for t in s.tiers}
    assert (by_tier["fast"].routed, by_tier["fast"].right) == (2, 1)
    assert by_tier["fast"].precision == 0.5 and by_tier["fast"].recall == 1.0
    assert by_tier["reasoning"].recall == 0.0 and by_tier["reasoning"].precision is None
    assert s.confusion[("reasoning", "fast")] == 1
    assert s.rules == {"short": (2, 1), "default": (1, 1), "images": (1, 1)}
    assert s.classes["maths"] == (1, 0)
    assert 0 < s.p50_us <= s.p95_us


def test_cost_and_latency_against_the_strongest_tier(tmp_path: Path, config: LoadedConfig) -> None:
    data = _write(tmp_path, ITEMS)
    dearest = ev.evaluate(data, config, observed=_observed()).comparison
    assert dearest is not None and dearest.baseline == "vision"  # priced as gpt-4o
    report = ev.evaluate(data, config, observed=_observed(), baseline="reasoning")
    c = report.comparison
    assert c is not None and c.baseline == "reasoning"
    assert c.cost_routed is not None and c.cost_baseline is not None
    assert 0 < c.cost_routed < c.cost_baseline
    assert c.saving is not None and 0 < c.saving < 1
    assert c.p50_baseline_ms == 3000.0
    # routed to fast, balanced, fast, vision: the median of 100, 400, 100, 800
    assert c.p50_routed_ms == 250.0
    # each tier's cost: its tokens in at the input price, its mean tokens out at the output price
    fast = report.prices["fast"]
    assert fast.per_token is not None and fast.output_tokens == 50.0
    text = ev.render(report)
    for expected in ("accuracy 75.0% (3/4)", "confusion", "rule fired", "saved", "250 ms"):
        assert expected in text


def test_without_figures_in_the_store_latency_is_unknown_and_says_why(
    tmp_path: Path, config: LoadedConfig
) -> None:
    report = ev.evaluate(
        _write(tmp_path, ITEMS), config, observed=({}, "the metrics store did not answer")
    )
    c = report.comparison
    assert c is not None and c.p50_routed_ms is None and c.p50_baseline_ms is None
    assert c.cost_routed is not None  # prices still known; output tokens assumed
    assert report.prices["fast"].output_tokens == ev.DEFAULT_OUTPUT_TOKENS
    text = ev.render(report)
    assert "p50 latency: unknown (the metrics store did not answer)" in text
    assert "tokens out assumed" in text and "nan" not in text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 1: not JSON"),
        ("[1, 2]", "line 1: not a JSON object"),
        ({"expected_tier": "gold", "prompt": "x"}, "line 1: 'expected_tier' must be a tier"),
        ({"expected_tier": "fast"}, "line 1: give either 'prompt'"),
        ({"expected_tier": "fast", "prompt": 3}, "line 1: 'prompt' must be text"),
        ({"expected_tier": "fast", "prompt": "x", "tier": "y"}, "line 1: unknown field 'tier'"),
        (
            {"expected_tier": "fast", "messages": [{"role": "wizard", "content": "x"}]},
            "line 1: 'messages.0",
        ),
    ],
)
def test_a_bad_line_is_named_with_its_field(
    tmp_path: Path, config: LoadedConfig, line: Any, message: str
) -> None:
    with pytest.raises(ev.DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ev.load_items(_write(tmp_path, [line]), config.tier_names)


def test_ids_must_be_unique(tmp_path: Path, config: LoadedConfig) -> None:
    with pytest.raises(ev.DataError, match="id 'a' is used twice"):
        ev.load_items(_write(tmp_path, [ITEMS[0], ITEMS[0]]), config.tier_names)


def test_the_command_prints_json_and_holds_a_minimum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ev, "read_observed", lambda hours: _observed())
    data = str(_write(tmp_path, ITEMS))
    cfg = str(rules_only(tmp_path))
    assert main(["eval", data, "--config", cfg, "--format", "json", "--baseline", "reasoning"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == 0.75 and out["tiers"]["fast"]["routed"] == 2
    assert out["comparison"]["baseline"] == "reasoning"
    assert main(["eval", data, "--config", cfg, "--min-accuracy", "0.8"]) == 1
    assert "below 80.0%" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.jsonl"), "--config", cfg]) == 2
    assert "eval: " in capsys.readouterr().err
    assert main(["eval", data, "--config", cfg, "--baseline", "gold"]) == 2
    assert "--baseline 'gold' is not a tier" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--hours", "0"], "--hours 0: must be above 0"),
        (["--output-tokens", "-1"], "--output-tokens -1: must be 0 or more"),
        (["--min-accuracy", "90"], "--min-accuracy 90: is a share, from 0 to 1"),
    ],
)
def test_option_values_out_of_range_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    data = str(_write(tmp_path, ITEMS))
    cfg = str(ROOT / "config" / "simulated.yaml")
    assert main(["eval", data, "--config", cfg, *option]) == 2
    assert message in capsys.readouterr().err


def test_the_shipped_config_is_scored_with_its_semantic_stage(tmp_path: Path) -> None:
    report = ev.evaluate(
        _write(tmp_path, ITEMS),
        load_config(ROOT / "config" / "simulated.yaml"),
        observed=_observed(),
    )
    # the short maths question goes by its text now, not by its length
    assert (report.scores.total, report.scores.right) == (4, 4)
    assert report.scores.rules["semantic:maths"] == (1, 1)
    assert report.scores.rules["images"] == (1, 1)
