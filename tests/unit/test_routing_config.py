from pathlib import Path

import pytest

from schemas.v1 import ChatRequest
from services.common.routing_config import ConfigError, load_config
from services.router.domain.classify import UnknownModel, classify

ROOT = Path(__file__).resolve().parents[2]

BASE = """
tiers:
  fast:
    models: [{model: openai/sim-light, api_base: "http://127.0.0.1:1/v1"}]
  slow:
    models: [{model: openai/sim-reasoning}]
rules:
  - {name: short, when: "len(prompt) < 20", tier: fast}
  - {name: think, when: requires_reasoning, tier: slow}
default: slow
fallback: fast
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["simulated.yaml", "switchboard.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(ROOT / "config" / name)
    assert set(config.tier_names) == {"fast", "balanced", "reasoning", "vision"}
    assert len(config.hash) == 16


def chat(text: str, **meta: object) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], metadata=meta)


@pytest.mark.parametrize(
    ("request_", "tier", "rule"),
    [
        (chat("hi"), "fast", "short"),
        (chat("x" * 50, requires_reasoning=True), "slow", "think"),
        (chat("hi", requires_reasoning=True), "fast", "short"),  # first match wins
        (chat("x" * 50), "slow", "default"),
        (
            ChatRequest(model="fast", messages=[{"role": "user", "content": "x" * 50}]),
            "fast",
            "forced",
        ),
    ],
)
def test_classify(tmp_path: Path, request_: ChatRequest, tier: str, rule: str) -> None:
    decision = classify(request_, load_config(write(tmp_path, BASE)))
    assert (decision.tier, decision.rule) == (tier, rule)


def test_unknown_model_names_the_choices(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    with pytest.raises(UnknownModel, match="switchboard/auto, fast, slow; or pin a model: "):
        classify(ChatRequest(model="gpt-5", messages=[{"role": "user", "content": "x"}]), config)


PINS = """
tiers:
  fast:
    models:
      - {model: openai/gpt-4o-mini, aliases: [mini]}
      - {model: openai/gpt-4.1, name: big}
  deep:
    models:
      - {model: openai/gpt-4.1, name: big, pinned_fallback: true}
      - {model: openai/o3}
default: fast
"""


def test_model_names_pin_through_the_tier_that_tries_the_model_first(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, PINS))
    pinned = {name: (pin.tier, pin.label) for name, pin in config.pins.items()}
    assert pinned == {
        "openai/gpt-4o-mini": ("fast", "openai/gpt-4o-mini"),
        "mini": ("fast", "openai/gpt-4o-mini"),
        "big": ("deep", "big"),  # first in deep, second in fast
        "openai/gpt-4.1": ("deep", "big"),
        "openai/o3": ("deep", "openai/o3"),
    }
    decision = classify(
        ChatRequest(model="mini", messages=[{"role": "user", "content": "x"}]), config
    )
    assert (decision.tier, decision.rule, decision.pinned) == (
        "fast",
        "pinned",
        "openai/gpt-4o-mini",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("      - {model: openai/gpt-4o, aliases: [mini]}\n", "'mini' names both"),
        ("      - {model: openai/gpt-4o, aliases: [deep]}\n", "names a model and a tier"),
        ("      - {model: openai/gpt-4o, name: switchboard/auto}\n", "names a model and a tier"),
    ],
)
def test_a_name_that_would_pin_two_things_is_a_config_error(
    tmp_path: Path, change: str, message: str
) -> None:
    text = PINS.replace("      - {model: openai/o3}\n", "      - {model: openai/o3}\n" + change)
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_simulated_config_sends_short_and_reasoning_to_different_tiers() -> None:
    config = load_config(ROOT / "config" / "simulated.yaml")
    short = classify(chat("What is 2+2?"), config)
    deep = classify(
        chat("Prove that there are infinitely many primes. " * 5, requires_reasoning=True), config
    )
    image = ChatRequest(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ]
    )
    assert short.tier == "fast" and deep.tier == "reasoning"
    assert classify(image, config).tier == "vision"


@pytest.mark.parametrize(
    ("edit", "key", "reason"),
    [
        (
            ("models: [{model: openai/sim-reasoning}]", "models: [{modle: x}]"),
            "tiers.slow.models[0].modle",
            "unknown key",
        ),
        (("tier: slow", "tier: glacial"), "rules[1].tier", "unknown tier 'glacial'"),
        (("default: slow", "default: nope"), "default", "unknown tier 'nope'"),
        (
            ("requires_reasoning, tier", "'last_user matches \"(\"', tier"),
            "rules[1].when",
            "bad regex",
        ),
        (("len(prompt) < 20", "lenght(prompt) < 20"), "rules[0].when", "unknown field 'lenght'"),
        (("fallback: fast", "fallbak: fast"), "fallbak", "unknown key"),
        (("name: think", "name: short"), "rules[1].name", "duplicate rule name"),
    ],
)
def test_bad_config_names_file_key_and_reason(
    tmp_path: Path, edit: tuple[str, str], key: str, reason: str
) -> None:
    path = write(tmp_path, BASE.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_env_interpolation_and_missing_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = BASE.replace("http://127.0.0.1:1/v1", "${SB_TEST_BASE:-http://fallback}/v1")
    config = load_config(write(tmp_path, text))
    assert config.tier("fast").models[0].api_base == "http://fallback/v1"
    monkeypatch.setenv("SB_TEST_BASE", "http://set")
    again = load_config(write(tmp_path, text))
    assert again.tier("fast").models[0].api_base == "http://set/v1"
    assert again.hash == config.hash  # the hash is of the file, not of the environment
    with pytest.raises(ConfigError, match="SB_TEST_UNSET is not set"):
        load_config(write(tmp_path, BASE.replace("http://127.0.0.1:1/v1", "${SB_TEST_UNSET}")))


def test_hash_changes_with_content(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, BASE)).hash
    b = load_config(write(tmp_path, BASE.replace("< 20", "< 21"))).hash
    assert a != b


def test_a_pinned_request_is_tried_on_its_model_alone_unless_it_allows_fallback(
    tmp_path: Path,
) -> None:
    from services.workers.domain.policy import attempts, pinned_models

    config = load_config(write(tmp_path, PINS))
    fast, deep = config.tier("fast"), config.tier("deep")
    assert [m.label for m in pinned_models(fast, None)] == ["openai/gpt-4o-mini", "big"]
    assert [m.label for m in pinned_models(fast, "big")] == ["big"]  # no fallback in fast
    assert [m.label for m in pinned_models(deep, "openai/o3")] == ["openai/o3"]
    assert [m.label for m in pinned_models(deep, "big")] == ["big", "openai/o3"]
    assert pinned_models(fast, "openai/o3") == []
    tries = [(a.index, a.spec.label, a.retry) for a in attempts(fast, pinned_models(fast, "big"))]
    assert tries == [(0, "big", 0), (1, "big", 1)]


@pytest.mark.parametrize(
    ("tier", "key", "reason"),
    [
        ("{kind: cascade, models: [{model: openai/sim-reasoning}]}", "tiers.t", "exactly when"),
        (
            "{models: [{model: openai/a}], cascade: {draft: {model: openai/b}}}",
            "tiers.t",
            "exactly when",
        ),
        (
            "{kind: cascade, models: [{model: openai/a}], cascade: {draft: {model: openai/b}, "
            "verify: {must_match: ['(']}}}",
            "tiers.t.cascade.verify.must_match",
            "bad regex",
        ),
        (
            "{kind: cascade, models: [{model: openai/a}], cascade: {draft: {model: openai/b}, "
            "verify: {judge: {model: {model: openai/c}, rubric: x, min_score: 11}}}}",
            "tiers.t.cascade.verify.judge.min_score",
            "",
        ),
    ],
)
def test_a_bad_cascade_fails_at_load_naming_the_key(
    tmp_path: Path, tier: str, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"tiers:\n  t: {tier}\ndefault: t\n"))
    assert err.value.key.startswith(key) and reason in str(err.value)


def test_the_cascade_example_loads() -> None:
    config = load_config(ROOT / "config" / "examples" / "cascade.yaml")
    cascade = config.tier("reasoning").cascade
    assert cascade is not None and cascade.draft.label == "sim-light"
    assert [m.label for m in config.tier("reasoning").models] == ["sim-reasoning"]
