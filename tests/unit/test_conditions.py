import pytest

from services.common.conditions import FIELDS, ConditionError, _Parser, compile_condition

FEATURES = {
    "prompt": "Please summarise this invoice",
    "last_user": "Please summarise this invoice",
    "prompt_chars": 29,
    "prompt_tokens": 8,
    "has_images": False,
    "image_count": 0,
    "requires_reasoning": True,
    "priority": 3,
    "task": "triage",
    "tenant": None,
    "tags.team": "billing",
    "tags.cost-centre": "ops",
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("requires_reasoning", True),
        ("not requires_reasoning", False),
        ("has_images", False),
        ("len(prompt) < 120", True),
        ("len(prompt) >= 29 and len(prompt) <= 29", True),
        ("prompt_tokens > 8", False),
        ("priority >= 3 and priority != 4", True),
        ('task == "triage"', True),
        ("task == 'reasoning' or priority > 5", False),
        ('task in ["triage", "classify"]', True),
        ('task in ["classify"]', False),
        ('last_user matches "(?i)INVOICE"', True),
        ('last_user matches "^refund"', False),
        ('tenant == "acme"', False),
        ("tenant == null", True),
        ('tenant matches "a"', False),
        ("tenant in ['a']", False),
        ("prompt_tokens < 8.5", True),
        ('tags.team == "billing"', True),
        ('tags.missing == "x"', False),
        ("not (has_images or priority < 1)", True),
        ("requires_reasoning and not has_images and task == 'triage'", True),
        ('tenant != "acme"', True),  # a plain absent field keeps its null semantics
        ('tags.cost-centre == "ops"', True),
        ("prompt_tokens * 4 >= prompt_chars", True),
        ("len(prompt) / 4 > prompt_tokens", False),
        ("priority in [-1, 3]", True),
        ("-priority in [-1, 3]", False),
    ],
)
def test_condition_evaluates(source: str, expected: bool) -> None:
    assert compile_condition(source).matches(FEATURES) is expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("prompt_lenght < 3", "unknown field 'prompt_lenght'"),
        ('last_user matches "(unclosed"', "bad regex"),
        ("prompt_tokens < 'ten'", "cannot compare int with str"),
        ("has_images > 1", "cannot compare bool with int"),
        ("task in 'abc'", "'in' needs a list"),
        ("len(priority) > 1", "len() takes a text field"),
        ("priority > ", "expected a value or field"),
        ("(priority > 1", "expected ')'"),
        ("priority > 1 priority", "unexpected 'priority'"),
        ("__import__('os')", "unknown field '__import__'"),
        ("priority ; 1", "unexpected character ';'"),
        ("", "empty condition"),
        ("1 matches 'x'", "'matches' needs a text field"),
    ],
)
def test_condition_rejects(source: str, message: str) -> None:
    with pytest.raises(ConditionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compile_condition(source)


def test_error_names_the_column() -> None:
    with pytest.raises(ConditionError) as info:
        compile_condition("priority > 1 and bogus")
    assert info.value.position == 17


# A canary's figures: a custom field set with dotted names, read whole.
METRICS: dict[str, type] = {
    "p95_latency_ms": float,
    "error_rate": float,
    "cost_per_1k": float,
    "accuracy_delta": float,
    "requests": int,
    "baseline.p95_latency_ms": float,
    "baseline.error_rate": float,
    "baseline.cost_per_1k": float,
    "baseline.accuracy_delta": float,
    "baseline.requests": int,
}
FIGURES = {
    "p95_latency_ms": 280.0,
    "error_rate": 0.015,
    "cost_per_1k": 2.1,
    "accuracy_delta": -0.01,
    "requests": 7,
    "baseline.p95_latency_ms": 250.0,
    "baseline.error_rate": 0.01,
    "baseline.cost_per_1k": 2.0,
    "baseline.requests": 0,  # baseline.accuracy_delta is absent
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # the canary criteria this language is for
        ("p95_latency_ms < 300", True),
        ("p95_latency_ms < 250", False),
        ("error_rate <= baseline.error_rate + 0.01", True),
        ("error_rate <= baseline.error_rate + 0.001", False),
        ("cost_per_1k <= baseline.cost_per_1k * 1.1", True),
        ("cost_per_1k <= baseline.cost_per_1k * 1.01", False),
        ("accuracy_delta >= -0.02", True),
        ("accuracy_delta >= -0.005", False),
        ("(p95_latency_ms - baseline.p95_latency_ms) / baseline.p95_latency_ms < 0.2", True),
        ("(p95_latency_ms - baseline.p95_latency_ms) / baseline.p95_latency_ms < 0.1", False),
        # precedence and associativity
        ("requests + 2 * 3 == 13", True),
        ("(requests + 2) * 3 == 27", True),
        ("requests - 3 - 2 == 2", True),
        ("requests / 7 * 2 == 2", True),
        ("28 / requests / 2 == 2", True),
        ("requests / 2 == 3.5", True),  # '/' is true division, even between ints
        ("1 + 2 * 3 - 4 / 2 == 5", True),
        ("requests > 2 * 3 and requests < 2 + 6", True),
        # unary minus
        ("-requests == -7", True),
        ("-(requests + 3) == -10", True),
        ("- -requests == 7", True),
        ("2 * -requests == -14", True),
        ("-requests * 2 < -13", True),
        ("-0.5 * 2 == -1", True),
        # a minus without spaces: after a plain name, and after a dotted one
        ("requests-1 == 6", True),
        ("baseline.cost_per_1k-1 == 1", True),
        # division by zero gives no value: every comparison with it is false
        ("requests / baseline.requests > 0", False),
        ("requests / baseline.requests <= 0", False),
        ("requests / baseline.requests == 0", False),
        ("requests / baseline.requests != 0", False),
        ("not (requests / baseline.requests > 0)", True),
        ("requests / baseline.requests + 1 > 0", False),
        # an absent value propagates through arithmetic
        ("baseline.accuracy_delta + 1 > 0", False),
        ("baseline.accuracy_delta + 1 <= 0", False),
        ("baseline.accuracy_delta * 0 == 0", False),
        ("-baseline.accuracy_delta != 1", False),
        ("1 - baseline.accuracy_delta in [1]", False),
        ("baseline.accuracy_delta == null", True),
    ],
)
def test_arithmetic_evaluates(source: str, expected: bool) -> None:
    assert compile_condition(source, METRICS, tags=False).matches(FIGURES) is expected


@pytest.mark.parametrize(
    ("source", "message", "column"),
    [
        ("priority + task > 1", "'+' needs numbers, not str", 12),
        ("has_images * 2 > 1", "'*' needs numbers, not bool", 1),
        ("-task == 'x'", "'-' needs a number, not str", 2),
        ("priority - null > 1", "'-' needs numbers, not null", 12),
        ("priority / [1] > 1", "'/' needs numbers, not a list", 12),
        ("(priority > 1) + 1", "'+' needs numbers, not bool", 11),  # the '>'
        ("tags.team - 1 > 0", "'-' needs numbers, not str", 1),
        ("len(prompt) + 'a' > 1", "'+' needs numbers, not str", 15),
        ("priority / 0 > 1", "division by zero", 12),
        ("priority / (2 - 2) > 1", "division by zero", 13),
        ("priority + 1 == null", "a computed value is never null", 14),
        ("priority + 1 > 'a'", "cannot compare int with str", 14),
        ("priority +", "expected a value or field, found 'end of condition'", 11),
        ("priority * * 2", "expected a value or field, found '*'", 12),
        ("task in [-'a']", "lists hold only numbers and strings", 11),
    ],
)
def test_arithmetic_rejects(source: str, message: str, column: int) -> None:
    with pytest.raises(ConditionError) as info:
        compile_condition(source)
    assert message in str(info.value)
    assert info.value.position == column - 1
    assert str(info.value).endswith(f"(at column {column})")


@pytest.mark.parametrize(
    ("source", "fields", "tags", "listed", "not_listed"),
    [
        ('tags.team == "x"', METRICS, False, "baseline.error_rate", "tags.<key>"),
        ('tags.team == "x"', {"x": int}, False, "known fields: x (at", "tags.<key>"),
        ("baseline < 1", METRICS, False, "baseline.requests", "prompt"),
        ("baseline.error_rate < 1", FIELDS, True, "prompt, prompt_chars", "baseline.error_rate,"),
        ("baseline.prompt < 1", FIELDS, True, "tags.<key>", "baseline.requests"),
        ("error_rate < 1", {}, False, "known fields: none", "tags.<key>"),
    ],
)
def test_unknown_field_lists_the_set_in_use(
    source: str, fields: dict[str, type], tags: bool, listed: str, not_listed: str
) -> None:
    with pytest.raises(ConditionError, match="unknown field") as info:
        compile_condition(source, fields, tags=tags)
    assert listed in str(info.value)
    assert not_listed not in str(info.value)
    assert info.value.position == 0


@pytest.mark.parametrize(
    ("source", "fields", "tags", "features", "expected"),
    [
        ("baseline.error_rate < 0.02", METRICS, False, FIGURES, True),
        ("error_rate < 0.012", METRICS, False, FIGURES, False),  # not baseline.error_rate
        ('tags.team == "billing"', FIELDS, True, FEATURES, True),
        ('tags.team == "billing"', {"tags.team": str}, False, FEATURES, True),  # a declared name
        ("p.q-r.s > 1", {"p.q": int, "r.s": int}, False, {"p.q": 5, "r.s": 3}, True),
    ],
)
def test_custom_field_sets(
    source: str,
    fields: dict[str, type],
    tags: bool,
    features: dict[str, object],
    expected: bool,
) -> None:
    assert compile_condition(source, fields, tags=tags).matches(features) is expected


@pytest.mark.parametrize("name", ["a.b.c", "len", "p95-latency", "9lives", "baseline."])
def test_field_set_refuses_names_a_condition_cannot_write(name: str) -> None:
    with pytest.raises(ValueError, match=f"field {name!r} cannot be written"):
        compile_condition("true", {name: int})


@pytest.mark.parametrize(
    ("source", "typ"),
    [
        ("priority + 1", int),
        ("priority - max_tokens * 2", int),
        ("-priority", int),
        ("len(prompt) - 1", int),
        ("2 * 3", int),
        ("priority / 1", float),
        ("6 / 3", float),
        ("priority * 1.5", float),
        ("-0.5", float),
    ],
)
def test_arithmetic_result_type(source: str, typ: type) -> None:
    # int and float compare freely, so the static type shows only here, not through matches()
    assert _Parser(source, FIELDS, tags=True).parse().typ is typ
