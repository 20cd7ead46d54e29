"""A cascade's verifier: each check, its order, and the judge's verdict."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.v1 import ChatRequest
from services.common.routing_config import JudgeSpec, ModelSpec, VerifySpec
from services.workers.domain.verifier import (
    JUDGE_SCHEMA,
    judge_request,
    judge_verdict,
    mean_logprob,
    verify,
)

SCHEMA = {
    "type": "object",
    "properties": {"queue": {"enum": ["billing", "bugs"]}, "priority": {"type": "integer"}},
    "required": ["queue", "priority"],
}


def body(text: str, logprobs: list[float] | None = None, **message: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text, **message},
    }
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": v} for v in logprobs]}
    return {"choices": [choice]}


def ask(**fields: Any) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "q"}], **fields)


PLAIN = VerifySpec()
STRICT = VerifySpec(
    min_chars=10,
    max_chars=60,
    must_match=(r"(?i)final answer",),
    must_not_match=(r"TODO",),
    min_mean_logprob=-1.0,
)


@pytest.mark.parametrize(
    ("spec", "request_", "answer", "accepted", "reason"),
    [
        (PLAIN, ask(), body("Reset it under Settings, then Security."), True, "passed"),
        (
            PLAIN,
            ask(),
            body("I'm not sure, but maybe x is 5."),
            False,
            'refusal or doubt: "I\'m not sure"',
        ),
        (PLAIN, ask(), body("I cannot be certain, but 5."), False, "refusal or doubt"),
        (PLAIN, ask(), body("I'm sorry, I can't fully answer that."), False, "refusal or doubt"),
        (PLAIN, ask(), body("As an AI, I have no view."), False, "refusal or doubt"),
        (VerifySpec(refusals=False), ask(), body("I'm not sure."), True, "passed"),
        (
            VerifySpec(refusals=(r"\bperhaps\b",)),
            ask(),
            body("perhaps 5"),
            False,
            "refusal or doubt: 'perhaps'",
        ),
        (PLAIN, ask(), body("   "), False, "too short: 0 characters, at least 1"),
        (STRICT, ask(), body("short"), False, "too short: 5 characters, at least 10"),
        (STRICT, ask(), body("x" * 61), False, "too long: 61 characters, at most 60"),
        (STRICT, ask(), body("x = 5, no doubt at all"), False, "does not match '(?i)final answer'"),
        (STRICT, ask(), body("TODO. Final answer: 5"), False, "matches 'TODO'"),
        (
            STRICT,
            ask(),
            body("Final answer: 5", [-2.0, -1.5]),
            False,
            "mean token logprob -1.75, under -1",
        ),
        (STRICT, ask(), body("Final answer: 5", [-0.1, -0.3]), True, "passed"),
        (STRICT, ask(), body("Final answer: 5"), True, "passed"),  # no logprobs: passed over
        # JSON asked: form first, whatever else
        (
            PLAIN,
            ask(response_format={"type": "json_object"}),
            body('{"a": 1'),
            False,
            "not valid JSON",
        ),
        (PLAIN, ask(response_format={"type": "json_object"}), body('{"a": 1}'), True, "passed"),
        (
            PLAIN,
            ask(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "t", "schema": SCHEMA},
                }
            ),
            body(json.dumps({"queue": "sales", "priority": 1})),
            False,
            "does not match the JSON Schema at queue",
        ),
        (
            PLAIN,
            ask(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "t", "schema": SCHEMA},
                }
            ),
            body(json.dumps({"queue": "bugs"})),
            False,
            "'priority' is a required property",
        ),
        (
            PLAIN,
            ask(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "t", "schema": SCHEMA},
                }
            ),
            body(json.dumps({"queue": "bugs", "priority": 2})),
            True,
            "passed",
        ),
        (
            VerifySpec(json_valid=False),
            ask(response_format={"type": "json_object"}),
            body("{"),
            True,
            "passed",
        ),
        # a tool call is the caller's code's to check
        (STRICT, ask(), body("", tool_calls=[{"id": "c", "type": "function"}]), True, "passed"),
    ],
)
def test_checks(
    spec: VerifySpec, request_: ChatRequest, answer: dict[str, Any], accepted: bool, reason: str
) -> None:
    verdict = verify(spec, request_, answer)
    assert verdict.accepted is accepted
    assert reason in verdict.reason


def test_mean_logprob() -> None:
    assert mean_logprob(body("x", [-1.0, -3.0])) == -2.0
    assert mean_logprob(body("x")) is None


JUDGE = JudgeSpec(
    model=ModelSpec(model="openai/sim-balanced"), rubric="Correct and complete.", min_score=7
)


def test_the_judge_is_asked_for_a_score_as_json() -> None:
    asked = judge_request(JUDGE, ask(metadata={"tenant": "t1"}), "x = 5")
    assert asked.response_format is not None and asked.response_format.type == "json_schema"
    assert asked.response_format.json_schema.schema_ == JUDGE_SCHEMA  # type: ignore[union-attr]
    assert "Correct and complete." in asked.messages[0].text()
    assert "x = 5" in asked.messages[1].text() and asked.metadata.tenant == "t1"


@pytest.mark.parametrize(
    ("answer", "accepted", "reason"),
    [
        ('{"score": 8}', True, "judge score 8"),
        ('{"score": 7}', True, "judge score 7"),
        ('{"score": 3.5}', False, "judge score 3.5, under 7"),
        ("eight", False, "the judge gave no score"),
        ('{"grade": 9}', False, "the judge gave no score"),
    ],
)
def test_the_judges_score_decides(answer: str, accepted: bool, reason: str) -> None:
    verdict = judge_verdict(JUDGE, body(answer))
    assert (verdict.accepted, verdict.reason) == (accepted, reason)
