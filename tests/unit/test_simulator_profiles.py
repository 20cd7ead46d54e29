"""The simulator's pure model: profile timings, token capping, text, fault queue and rates."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.simulator.config import SimulatorSettings
from services.simulator.profiles import (
    BUILTIN_PROFILES,
    IMAGE_TOKENS,
    FaultKind,
    FaultPlan,
    LatencyProfile,
    SimulatorStats,
    completion_words,
    load_profiles,
    prompt_tokens,
    resolve_model,
)

LIGHT = BUILTIN_PROFILES["sim-light"]


@pytest.mark.parametrize(
    ("name", "total_s"),
    [
        ("sim-light", 0.8),
        ("sim-balanced", 1.6),
        ("sim-balanced-next", 1.38),
        ("sim-reasoning", 4.0),
        ("sim-vision", 1.5),
    ],
)
def test_builtin_profiles_have_their_class_durations(name: str, total_s: float) -> None:
    profile = BUILTIN_PROFILES[name]
    assert profile.nominal_total_s == pytest.approx(total_s, rel=0.02)
    plan = profile.plan(max_tokens=None, latency_scale=1.0)
    assert plan.total_s == pytest.approx(profile.nominal_total_s)
    assert plan.completion_tokens == profile.output_tokens
    assert plan.finish_reason == "stop"


def test_balanced_next_is_a_slightly_faster_balanced_model() -> None:
    current, candidate = BUILTIN_PROFILES["sim-balanced"], BUILTIN_PROFILES["sim-balanced-next"]
    assert candidate.output_tokens == current.output_tokens  # same class: answers as long
    assert candidate.ttft_s < current.ttft_s and candidate.tokens_per_s > current.tokens_per_s
    assert 0.8 < candidate.nominal_total_s / current.nominal_total_s < 0.9


def test_reasoning_thinks_before_answering() -> None:
    reasoning = BUILTIN_PROFILES["sim-reasoning"]
    assert reasoning.ttft_s >= 2.0
    assert reasoning.ttft_s > 4 * LIGHT.ttft_s


def test_instant_profile_takes_no_time() -> None:
    plan = BUILTIN_PROFILES["sim-instant"].plan(max_tokens=None, latency_scale=1.0, jitter_draw=1)
    assert plan.total_s == 0
    assert plan.completion_tokens > 0


def test_max_tokens_caps_output_and_finishes_with_length() -> None:
    plan = LIGHT.plan(max_tokens=10, latency_scale=1.0)
    assert (plan.completion_tokens, plan.finish_reason) == (10, "length")
    assert plan.total_s == pytest.approx(LIGHT.ttft_s + 10 / LIGHT.tokens_per_s)
    roomy = LIGHT.plan(max_tokens=LIGHT.output_tokens + 100, latency_scale=1.0)
    assert (roomy.completion_tokens, roomy.finish_reason) == (LIGHT.output_tokens, "stop")


def test_latency_scale_and_jitter_multiply_every_delay() -> None:
    nominal = LIGHT.plan(max_tokens=None, latency_scale=1.0)
    scaled = LIGHT.plan(max_tokens=None, latency_scale=0.01)
    assert scaled.total_s == pytest.approx(nominal.total_s * 0.01)
    slow = LIGHT.plan(max_tokens=None, latency_scale=1.0, jitter_draw=1.0)
    fast = LIGHT.plan(max_tokens=None, latency_scale=1.0, jitter_draw=-5.0)  # clamped to -1
    assert slow.total_s == pytest.approx(nominal.total_s * (1 + LIGHT.jitter))
    assert fast.total_s == pytest.approx(nominal.total_s * (1 - LIGHT.jitter))


@pytest.mark.parametrize("name", sorted(BUILTIN_PROFILES))
def test_stream_chunks_cover_every_token_every_20_to_50_ms(name: str) -> None:
    profile = BUILTIN_PROFILES[name]
    plan = profile.plan(max_tokens=None, latency_scale=1.0)
    bounds = plan.chunk_bounds()
    assert bounds[0][0] == 0 and bounds[-1][1] == plan.completion_tokens
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    if not math.isinf(profile.tokens_per_s):
        assert 0.02 <= profile.tokens_per_chunk / profile.tokens_per_s <= 0.05


def test_profile_validation_rejects_impossible_values() -> None:
    with pytest.raises(ValidationError):
        LatencyProfile(ttft_s=0.1, tokens_per_s=0, output_tokens=10)
    with pytest.raises(ValidationError):
        LatencyProfile(
            ttft_s=0.1, tokens_per_s=10, output_tokens=10, error_rate_429=0.6, error_rate_500=0.6
        )


def test_updated_merges_fields_and_validates_the_whole_profile() -> None:
    flaky = LIGHT.updated({"error_rate_429": 0.7, "ttft_s": 3.0})
    assert (flaky.error_rate_429, flaky.ttft_s) == (0.7, 3.0)
    assert flaky.model_dump() == {**LIGHT.model_dump(), "error_rate_429": 0.7, "ttft_s": 3.0}
    assert LIGHT.error_rate_429 == 0 and LIGHT.ttft_s == 0.25  # frozen: a new profile
    assert LIGHT.updated({}) == LIGHT
    with pytest.raises(ValidationError, match="must be <= 1"):
        flaky.updated({"error_rate_500": 0.5})  # 0.7 + 0.5, the merged rates are checked
    with pytest.raises(ValidationError) as refused:
        LIGHT.updated({"ttft": 1.0})
    assert refused.value.errors()[0]["loc"] == ("ttft",)
    with pytest.raises(ValidationError) as refused:
        LIGHT.updated({"tokens_per_s": 0})
    assert refused.value.errors()[0]["loc"] == ("tokens_per_s",)


@pytest.mark.parametrize("name", sorted(BUILTIN_PROFILES))
def test_profiles_round_trip_through_json(name: str) -> None:
    profile = BUILTIN_PROFILES[name]
    fields = profile.model_dump(mode="json")
    quality = fields.pop("quality")
    assert all(isinstance(v, str | int | float) and v != math.inf for v in fields.values())
    assert all(isinstance(v, float) for v in quality.values())
    assert LatencyProfile.model_validate({**fields, "quality": quality}) == profile


def test_no_pacing_is_inf_in_json() -> None:
    assert BUILTIN_PROFILES["sim-instant"].model_dump(mode="json")["tokens_per_s"] == "inf"
    assert BUILTIN_PROFILES["sim-instant"].model_dump()["tokens_per_s"] == math.inf


def test_load_profiles_overrides_and_adds(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n"
        "  sim-light: {error_rate_429: 0.5}\n"
        "  sim-custom: {ttft_s: 0.1, tokens_per_s: 50, output_tokens: 20}\n"
    )
    profiles = load_profiles(path)
    assert profiles["sim-light"].error_rate_429 == 0.5
    assert profiles["sim-light"].ttft_s == LIGHT.ttft_s  # other fields kept
    assert profiles["sim-custom"].nominal_total_s == pytest.approx(0.5)
    assert BUILTIN_PROFILES["sim-light"].error_rate_429 == 0  # built-ins untouched
    assert load_profiles(None) == dict(BUILTIN_PROFILES)


def test_load_profiles_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("profiles:\n  sim-new: {ttft_s: 0.1}\n")  # missing speed and length
    with pytest.raises(ValidationError):
        load_profiles(path)
    path.write_text("profiles: [1, 2]\n")
    with pytest.raises(ValueError, match="mapping"):
        load_profiles(path)


def test_resolve_model_strips_the_litellm_prefix() -> None:
    assert resolve_model("openai/sim-light", BUILTIN_PROFILES) == "sim-light"
    assert resolve_model("sim-vision", BUILTIN_PROFILES) == "sim-vision"
    assert resolve_model("gpt-4o", BUILTIN_PROFILES) is None


def test_fault_queue_is_fifo_per_matching_model() -> None:
    plan = FaultPlan()
    plan.enqueue("sim-light", FaultKind.RATE_LIMIT, 2)
    plan.enqueue("*", FaultKind.SERVER_ERROR, 1)
    plan.enqueue("sim-light", FaultKind.TIMEOUT, 1)
    assert plan.next_fault("sim-balanced", BUILTIN_PROFILES["sim-balanced"]) == "500"
    served = [plan.next_fault("sim-light", LIGHT) for _ in range(4)]
    assert served == [FaultKind.RATE_LIMIT, FaultKind.RATE_LIMIT, FaultKind.TIMEOUT, None]
    assert plan.pending() == []


def test_forced_fault_wins_and_leaves_the_queue_alone() -> None:
    plan = FaultPlan()
    plan.enqueue("*", FaultKind.RATE_LIMIT, 1)
    assert plan.next_fault("sim-light", LIGHT, forced=FaultKind.DISCONNECT) == "disconnect"
    assert plan.pending() == [{"model": "*", "kind": "429", "count": 1}]
    assert plan.clear() == 1
    assert plan.next_fault("sim-light", LIGHT) is None


def test_seeded_fault_rates_are_reproducible_and_roughly_right() -> None:
    flaky = LatencyProfile(
        ttft_s=0, tokens_per_s=100, output_tokens=10, error_rate_429=0.2, timeout_rate=0.1
    )
    runs = []
    for _ in range(2):
        plan = FaultPlan(seed=7)
        runs.append([plan.next_fault("m", flaky) for _ in range(2000)])
    assert runs[0] == runs[1]
    assert runs[0].count(FaultKind.RATE_LIMIT) / 2000 == pytest.approx(0.2, abs=0.03)
    assert runs[0].count(FaultKind.TIMEOUT) / 2000 == pytest.approx(0.1, abs=0.03)
    assert FaultKind.SERVER_ERROR not in runs[0]
    other = FaultPlan(seed=8)
    assert [other.next_fault("m", flaky) for _ in range(2000)] != runs[0]


def test_fault_free_models_do_not_shift_the_seeded_sequence() -> None:
    flaky = LatencyProfile(ttft_s=0, tokens_per_s=100, output_tokens=10, error_rate_500=0.5)
    plain, mixed = FaultPlan(seed=1), FaultPlan(seed=1)
    expected = [plain.next_fault("m", flaky) for _ in range(50)]
    got = []
    for _ in range(50):
        assert mixed.next_fault("sim-light", LIGHT) is None
        got.append(mixed.next_fault("m", flaky))
    assert got == expected


def test_prompt_tokens_count_text_and_images() -> None:
    messages = [
        {"role": "system", "content": "abcde"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "abcd"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,xx"}},
            ],
        },
        {"role": "assistant", "content": None},
    ]
    assert prompt_tokens(messages) == math.ceil(9 / 4) + IMAGE_TOKENS
    assert prompt_tokens([{"role": "user", "content": ""}]) == 0


def test_completion_words_are_deterministic_and_quote_the_prompt() -> None:
    messages = [{"role": "user", "content": "What is the capital of France? " * 5}]
    words = completion_words("sim-light", messages, 50)
    assert len(words) == 50
    text = " ".join(words)
    assert text.startswith("Simulated answer from sim-light to: What is the capital of France?")
    assert completion_words("sim-light", messages, 50) == words
    assert completion_words("sim-light", messages, 3) == ["Simulated", "answer", "from"]
    other = completion_words("sim-light", [{"role": "user", "content": "Hi"}], 50)
    assert other != words


def test_stats_count_per_model() -> None:
    stats = SimulatorStats(["sim-light"])
    stats.request("sim-light")
    stats.fault("sim-light", FaultKind.RATE_LIMIT)
    stats.request("sim-light")
    stats.completed("sim-light")
    snap = stats.snapshot()["sim-light"]
    assert (snap["requests"], snap["completed"], snap["faults"]["429"]) == (2, 1, 1)
    assert snap["faults"]["timeout"] == 0


def test_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_SIMULATOR_LATENCY_SCALE", "0.05")
    monkeypatch.setenv("SWITCHBOARD_SIMULATOR_PORT", "9999")
    monkeypatch.setenv("SWITCHBOARD_PORT", "1")  # another service's variable: ignored
    settings = SimulatorSettings()
    assert (settings.latency_scale, settings.port, settings.host) == (0.05, 9999, "127.0.0.1")
    assert settings.profiles_file is None and settings.seed == 0
    assert all(f.description for f in SimulatorSettings.model_fields.values())
