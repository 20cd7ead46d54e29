import pytest

from services.common.conditions import ConditionError, compile_condition

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
