"""The simulator's answer quality: the prompt classifier, the verdict's determinism and rate, the
shape of good and poor answers, and ``quality`` in profiles (YAML and runtime changes)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.simulator.profiles import (
    BUILTIN_PROFILES,
    SimulatorStats,
    completion_words,
    load_profiles,
)
from services.simulator.quality import (
    CLASS_RULES,
    FINAL_ANSWER,
    HEDGES,
    POOR_MIN_TOKENS,
    POOR_OPENERS,
    PromptClass,
    QualityRates,
    Verdict,
    classify,
    judge,
    poor_length,
    shape_words,
)

LIGHT = BUILTIN_PROFILES["sim-light"]
FINAL_LINE = re.compile(rf"(?m)^{re.escape(FINAL_ANSWER)}$")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # the examples the feature was specified with
        ("Find x if 3x + 7 = 22 and explain each step", "maths"),
        (
            "If all bloops are razzies and some razzies are lazzies, must some bloops be lazzies?",
            "reasoning",
        ),
        ("Write a function that returns the longest palindromic substring", "coding"),
        ("How do I reset my password?", "support"),
        # one or two more per class
        ("Differentiate f(x) = ln(x^2 + 1) and simplify.", "maths"),
        ("What's the probability of two sixes in a row?", "maths"),
        ("Knights always tell the truth and knaves always lie. Who is the knave?", "reasoning"),
        ("Should we build or buy a warehouse system? Weigh the trade-offs.", "reasoning"),
        ("Why does this segfault?\n```c\nchar *p = 0; *p = 1;\n```", "coding"),
        ("Write a SQL query for the top 3 customers by revenue, 2 + 2 = 4 aside", "coding"),
        ('Extract the date from: "The warranty expires on 14 March 2027."', "extraction"),
        ("Return the invoice number and total as JSON", "extraction"),
        ('Classify the sentiment of this review: "Arrived late, works fine."', "classification"),
        ('Is this email spam? "You won a cruise!!!"', "classification"),
        ("I was charged twice for order #48213, can I get a refund?", "support"),
        ("Write a polite email to our supplier moving the delivery to May.", "writing"),
        ("Summarise the routing table for the on-call engineer.", "writing"),
        ("hey! how's it going?", "chit_chat"),
        ("What's the capital of Australia?", "chit_chat"),
        ("Stream number 3", "other"),
        ("", "other"),
    ],
)
def test_classifier(prompt: str, expected: str) -> None:
    assert classify(prompt) == PromptClass(expected)


def test_classifier_rules_cover_every_class_but_the_fallback() -> None:
    ruled = [prompt_class for prompt_class, _ in CLASS_RULES]
    assert len(ruled) == len(set(ruled))
    assert set(ruled) == set(PromptClass) - {PromptClass.OTHER}


def test_a_long_message_is_classified_by_its_head_and_tail() -> None:
    filler = "The quarterly report lists figures for each region. " * 400
    assert classify(f"{filler}Write a Python function that totals them.") == "coding"
    assert classify(f"Summarise this report. {filler}") == "writing"
    middle = f"{filler}Solve 3x + 7 = 22. {filler}"
    assert classify(middle) == "other"  # the middle of a pasted document is not read


# Inputs that make a rule with an unbounded gap, or nested quantifiers, backtrack for minutes.
@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text", ["1," * 3000, "1.2." * 2000, "turn this " * 800, "a 1 b 2 c 3 " * 300, "1" * 8000]
)
def test_the_classifier_does_not_backtrack_on_long_repetitive_prompts(text: str) -> None:
    classify(text)
    for _, pattern in CLASS_RULES:
        pattern.search(text)


def _prompts(count: int) -> list[str]:
    return [f"Solve {n}x + {n % 7} = {3 * n} for x, request {n}" for n in range(count)]


def test_the_verdict_is_deterministic_per_model_prompt_and_choice() -> None:
    rates = QualityRates(maths=0.5)
    prompts = _prompts(200)
    first = [judge("sim-light", p, 0, PromptClass.MATHS, rates) for p in prompts]
    assert [judge("sim-light", p, 0, PromptClass.MATHS, rates) for p in prompts] == first
    # each of model and choice index is part of the hash: change one, the verdicts change
    for model, variant in (("sim-balanced", 0), ("sim-light", 1)):
        other = [judge(model, p, variant, PromptClass.MATHS, rates).poor for p in prompts]
        assert other != [v.poor for v in first]


# 2,000 prompts: the poor count of a fair hash is Binomial(2000, 1 - rate), whose standard
# deviation is at most sqrt(0.25 / 2000) ≈ 0.0112 of a share. 0.045 is 4 of them, so a fair
# hash fails this about once in 16,000 prompt sets; the set is fixed, so the test is stable,
# yet a comparison the wrong way round (poor share = rate) is off by 0.2 or more and fails.
RATE_TOLERANCE = 0.045


@pytest.mark.parametrize("rate", [0.2, 0.25, 0.4, 0.6, 0.75, 0.95])
def test_over_many_prompts_the_poor_share_matches_the_rate(rate: float) -> None:
    prompts = _prompts(2000)
    rates = QualityRates(maths=rate)
    poor = sum(judge("sim-light", p, 0, PromptClass.MATHS, rates).poor for p in prompts)
    assert poor / len(prompts) == pytest.approx(1 - rate, abs=RATE_TOLERANCE)


def test_rates_of_zero_and_one_and_lower_rates_only_add_poor_answers() -> None:
    prompts = _prompts(300)

    def poor(rate: float) -> set[str]:
        rates = QualityRates(coding=rate)
        return {p for p in prompts if judge("m", p, 0, PromptClass.CODING, rates).poor}

    assert poor(0.0) == set(prompts) and poor(1.0) == set()
    assert poor(0.9) <= poor(0.6) <= poor(0.2)
    # a class without a rate is 1.0: the other classes of this profile stay good
    assert not any(
        judge("m", p, 0, PromptClass.MATHS, QualityRates(coding=0)).poor for p in prompts
    )


def test_poor_answers_rotate_among_the_openers() -> None:
    verdicts = [judge("m", p, 0, PromptClass.MATHS, QualityRates(maths=0)) for p in _prompts(100)]
    assert {v.opener for v in verdicts} == set(POOR_OPENERS)


@pytest.mark.parametrize("opener", POOR_OPENERS)
def test_every_opener_is_a_hedge(opener: str) -> None:
    assert HEDGES.search(opener)


def _words(prompt: str, tokens: int = 66) -> list[str]:
    return completion_words("sim-light", [{"role": "user", "content": prompt}], tokens)


POOR = Verdict(PromptClass.MATHS, poor=True, opener="I'm not sure, but")
GOOD_MATHS = Verdict(PromptClass.MATHS, poor=False, opener=POOR_OPENERS[0])


def test_a_poor_answer_opens_with_its_opener_and_has_no_final_answer() -> None:
    words = _words("Give the Final answer: what is 2 + 2?", 22)
    shaped = shape_words(words, POOR, final_line=True)
    text = " ".join(shaped)
    assert len(shaped) == len(words)  # one word per token, as planned
    assert text.startswith("I'm not sure, but Simulated answer from sim-light to: Give the")
    assert not re.search(r"final\s+answer", text, re.IGNORECASE)  # not even the prompt's


@pytest.mark.parametrize(
    ("prompt_class", "final_line", "ends_with_final_answer"),
    [
        (PromptClass.MATHS, True, True),
        (PromptClass.REASONING, True, True),
        (PromptClass.MATHS, False, False),  # cut by max_tokens, or a JSON answer
        (PromptClass.CODING, True, False),
        (PromptClass.SUPPORT, True, False),
    ],
)
def test_a_good_answer_has_no_hedge_and_a_final_answer_for_maths_and_reasoning(
    prompt_class: PromptClass, final_line: bool, ends_with_final_answer: bool
) -> None:
    words = _words("Sorry, I'm not sure I can't do 3x + 7 = 22, I don't know how")
    assert HEDGES.search(" ".join(words))  # the prompt, quoted, hedges
    shaped = shape_words(words, Verdict(prompt_class, False, ""), final_line)
    text = " ".join(shaped)
    assert len(shaped) == len(words) and len(text.split()) == len(words)
    assert not HEDGES.search(text)
    assert bool(FINAL_LINE.search(text)) is ends_with_final_answer
    assert text.endswith(FINAL_ANSWER) is ends_with_final_answer


@pytest.mark.parametrize(
    "prompt",
    [
        "I'm afraid my parcel is lost",
        "As an AI, can you help?",
        "I won't be able to pay, I'm unable to log in",
        "I\u2019m not certain I can\u2019t",
    ],
)
def test_a_good_answer_masks_the_hedges_its_prompt_quotes(prompt: str) -> None:
    words = _words(prompt)
    assert HEDGES.search(" ".join(words))
    shaped = shape_words(words, Verdict(PromptClass.SUPPORT, False, ""), final_line=True)
    assert not HEDGES.search(" ".join(shaped)) and len(shaped) == len(words)


def test_a_good_answer_too_short_for_the_final_line_is_left_alone() -> None:
    words = _words("Solve 2x = 4", 3)
    assert shape_words(words, GOOD_MATHS, final_line=True) == words


@pytest.mark.parametrize(
    ("output_tokens", "poor_tokens"), [(66, 22), (88, 30), (90, 30), (16, 12), (5, 5)]
)
def test_a_poor_answer_is_a_third_of_the_usual_length(output_tokens: int, poor_tokens: int) -> None:
    assert poor_length(output_tokens) == poor_tokens
    assert poor_length(output_tokens) <= output_tokens
    assert poor_length(1000) == math.ceil(1000 / 3) and poor_length(20) == POOR_MIN_TOKENS


def test_a_shortened_plan_stops_sooner_and_a_cap_still_wins() -> None:
    plan = LIGHT.plan(max_tokens=None, latency_scale=1.0)
    short = plan.shortened(22)
    assert (short.completion_tokens, short.finish_reason) == (22, "stop")
    assert short.total_s < plan.total_s and short.ttft_s == plan.ttft_s
    capped = LIGHT.plan(max_tokens=7, latency_scale=1.0)
    assert capped.shortened(22) == capped  # 7 tokens, cut by max_tokens: "length"


def test_builtin_quality_orders_the_models_and_spares_the_benchmark_model() -> None:
    quality = {name: profile.quality for name, profile in BUILTIN_PROFILES.items()}
    for hard in ("maths", "reasoning", "coding"):
        light, balanced = (
            getattr(quality["sim-light"], hard),
            getattr(quality["sim-balanced"], hard),
        )
        assert light < balanced < getattr(quality["sim-reasoning"], hard)
        assert getattr(quality["sim-reasoning"], hard) >= 0.95
        assert light <= 0.4
    assert quality["sim-instant"] == QualityRates()
    assert all(rate == 1.0 for rate in quality["sim-instant"].model_dump().values())
    easy = set(PromptClass) - {PromptClass.MATHS, PromptClass.REASONING, PromptClass.CODING}
    for rates in quality.values():
        assert all(rates.rate(c) == 1.0 for c in easy)


def test_quality_merges_class_by_class_and_refuses_unknown_classes_by_name() -> None:
    patched = LIGHT.updated({"quality": {"maths": 0.9}})
    assert patched.quality.maths == 0.9
    assert patched.quality.reasoning == LIGHT.quality.reasoning  # the other classes are kept
    assert patched.ttft_s == LIGHT.ttft_s
    with pytest.raises(ValidationError) as refused:
        LIGHT.updated({"quality": {"mathz": 0.5}})
    error = refused.value.errors()[0]
    assert (error["type"], error["loc"]) == ("extra_forbidden", ("quality", "mathz"))
    with pytest.raises(ValidationError) as refused:
        LIGHT.updated({"quality": {"coding": 1.5}})
    assert refused.value.errors()[0]["loc"] == ("quality", "coding")
    with pytest.raises(ValidationError):
        LIGHT.updated({"quality": 0.5})


def test_quality_in_a_profiles_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n"
        "  sim-light: {quality: {maths: 0.5, support: 0.7}}\n"
        "  sim-custom: {ttft_s: 0.1, tokens_per_s: 50, output_tokens: 20, "
        "quality: {coding: 0.1}}\n"
    )
    profiles = load_profiles(path)
    light = profiles["sim-light"].quality
    assert (light.maths, light.support, light.reasoning) == (0.5, 0.7, LIGHT.quality.reasoning)
    assert profiles["sim-custom"].quality == QualityRates(coding=0.1)


def test_a_profiles_file_with_an_unknown_class_is_refused_naming_file_profile_and_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  sim-light: {quality: {mathz: 0.5}}\n")
    with pytest.raises(ValidationError) as refused:
        load_profiles(path)
    assert refused.value.errors()[0]["loc"] == ("quality", "mathz")
    assert f"in {path}, profile 'sim-light'" in refused.value.__notes__


def test_stats_count_answers_and_poor_answers_per_class() -> None:
    stats = SimulatorStats(["sim-light"])
    stats.answered("sim-light", PromptClass.MATHS, poor=True)
    stats.answered("sim-light", PromptClass.MATHS, poor=False)
    stats.answered("sim-light", PromptClass.SUPPORT, poor=False)
    quality = stats.snapshot()["sim-light"]["quality"]
    assert quality["maths"] == {"served": 2, "poor": 1}
    assert quality["support"] == {"served": 1, "poor": 0}
    assert set(quality) == {c.value for c in PromptClass}
