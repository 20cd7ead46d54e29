"""The cheap signals rules can read: what each one sees, and what it leaves alone."""

from __future__ import annotations

import pytest

from schemas.v1 import ChatRequest
from services.common.conditions import compile_condition
from services.router.domain import signals
from services.router.domain.classify import Features, features

MATHS = "Find x if 3x + 7 = 22 and explain each step"
LOGIC = "If all bloops are razzies and some razzies are lazzies, must some bloops be lazzies?"
CODING = "Write a function that returns the longest palindromic substring"
SUPPORT = "How do I reset my password?"


def _request(*turns: str) -> ChatRequest:
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return ChatRequest.model_validate({"messages": messages})


@pytest.mark.parametrize(
    ("text", "code", "math", "steps", "markers"),
    [
        (MATHS, False, True, True, 1),
        (LOGIC, False, False, False, 3),  # if all, some ... are, must
        (CODING, True, False, False, 0),
        (SUPPORT, False, False, False, 0),
        ("Where is my Amazon Prime order?", False, False, False, 0),
        ("```python\nprint(1)\n```\nwhy does this fail?", True, False, False, 1),
        ("Compute \\frac{1}{2} + \\sqrt{2}", False, True, False, 0),
        ("1. open the app\n2. tap settings\n3. tap reset", False, False, True, 0),
        ("First copy the file, then restart the service", False, False, True, 0),
        ("SELECT name FROM users WHERE id = 3", True, False, False, 0),
        ("Solve for y: y^2 = 16", False, True, False, 0),
    ],
)
def test_each_signal_sees_what_it_names(
    text: str, code: bool, math: bool, steps: bool, markers: int
) -> None:
    assert signals.has_code(text) is code
    assert signals.has_math(text) is math
    assert signals.multi_step(text) is steps
    assert signals.reasoning_markers(text) == markers


def test_markers_count_each_word_once() -> None:
    assert signals.reasoning_markers("why why WHY, explain why") == 2


def test_complexity_orders_the_issue_examples_above_a_support_question() -> None:
    def score(text: str) -> int:
        return Features(_request(text)).get("complexity")

    assert score(SUPPORT) == 0
    assert score(CODING) == 2
    assert score(MATHS) == 5  # maths 2, steps 2, one marker
    assert score(LOGIC) == 3  # markers, capped at 3
    assert 0 <= score(" ".join([MATHS, LOGIC, CODING] * 40)) <= 10


def test_complexity_counts_long_messages_and_long_conversations() -> None:
    long = "word " * (signals.LONG_WORDS + 1)
    assert Features(_request(long)).get("complexity") == 1
    turns = [SUPPORT, "an answer"] * (signals.LONG_TURNS + 1)
    request = _request(*turns)
    assert Features(request).get("user_turns") == signals.LONG_TURNS + 1
    assert Features(request).get("complexity") == 1


def test_signals_read_the_last_user_message_only() -> None:
    request = _request(MATHS, "an answer", SUPPORT)
    feats = features(request)
    assert (feats["has_math"], feats["multi_step"], feats["complexity"]) == (False, False, 0)
    assert feats["user_turns"] == 2


def test_a_long_message_is_scanned_at_its_two_ends() -> None:
    filler = "x" * (3 * signals.EDGE_CHARS)
    assert not signals.has_math(signals.scanned(filler + " " + MATHS + " " + filler))
    assert signals.has_math(signals.scanned(MATHS + " " + filler))
    assert signals.has_math(signals.scanned(filler + " " + MATHS))
    assert signals.scanned(MATHS) == MATHS


def test_rules_can_read_the_signals() -> None:
    rule = compile_condition("has_math or reasoning_markers >= 2 or complexity >= 4")
    assert rule.matches(Features(_request(MATHS)))
    assert rule.matches(Features(_request(LOGIC)))
    assert not rule.matches(Features(_request(SUPPORT)))
    assert not rule.matches(Features(_request(CODING)))
