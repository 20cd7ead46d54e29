"""A cascade's verifier: does the draft model's answer stand, and if not, why.

The checks run in a fixed order and the first that fails is the reason kept in the draft's row:
the answer's form first (JSON where JSON was asked, its schema), then refusal and uncertainty
phrases, length, the regexes it must and must not match, and the mean log probability of its
tokens (where the provider returned any). A judge model, when configured, is asked only about
drafts that passed all of these (``judge_request``, ``judge_score``): it is the costly check.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from schemas.v1 import ChatRequest, JSONObjectFormat, JSONSchemaFormat
from services.common.routing_config import JudgeSpec, VerifySpec

# The judge answers in this shape (asked as response_format json_schema).
JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}},
    "required": ["score"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str  # "passed", or what failed

    @classmethod
    def passed(cls) -> Verdict:
        return cls(True, "passed")


def answer_text(body: dict[str, Any]) -> str:
    choices = body.get("choices") or [{}]
    return str((choices[0].get("message") or {}).get("content") or "")


def mean_logprob(body: dict[str, Any]) -> float | None:
    """The mean log probability of the first choice's tokens; None when none came back."""
    choices = body.get("choices") or [{}]
    entries = ((choices[0].get("logprobs") or {}).get("content")) or []
    values = [e["logprob"] for e in entries if isinstance(e, dict) and "logprob" in e]
    return sum(values) / len(values) if values else None


def verify(spec: VerifySpec, request: ChatRequest, body: dict[str, Any]) -> Verdict:
    """Every check but the judge's, in order; the first failure is the verdict."""
    choices = body.get("choices") or [{}]
    if (choices[0].get("message") or {}).get("tool_calls"):
        return Verdict.passed()  # a tool call is checked by the caller's code, not by text
    text = answer_text(body)
    for check in (_form, _refusal, _length, _patterns, _confidence):
        failed = check(spec, request, text, body)
        if failed:
            return Verdict(False, failed)
    return Verdict.passed()


def _form(spec: VerifySpec, request: ChatRequest, text: str, _: dict[str, Any]) -> str | None:
    asked = request.response_format
    if not spec.json_valid or not isinstance(asked, JSONObjectFormat | JSONSchemaFormat):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at character {exc.pos})"
    schema = asked.json_schema.schema_ if isinstance(asked, JSONSchemaFormat) else None
    if not schema:
        return None
    try:
        error = next(iter(Draft202012Validator(schema).iter_errors(value)), None)
    except SchemaError:
        return None  # the caller's schema is the provider's to refuse, not the draft's fault
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the answer"
    return f"does not match the JSON Schema at {where}: {error.message}"


def _refusal(spec: VerifySpec, _: ChatRequest, text: str, __: dict[str, Any]) -> str | None:
    for pattern in spec.refusal_patterns:
        found = re.search(pattern, text, re.IGNORECASE)
        if found:
            return f"refusal or doubt: {found.group(0)!r}"
    return None


def _length(spec: VerifySpec, _: ChatRequest, text: str, __: dict[str, Any]) -> str | None:
    size = len(text.strip())
    if size < spec.min_chars:
        return f"too short: {size} characters, at least {spec.min_chars}"
    if spec.max_chars is not None and size > spec.max_chars:
        return f"too long: {size} characters, at most {spec.max_chars}"
    return None


def _patterns(spec: VerifySpec, _: ChatRequest, text: str, __: dict[str, Any]) -> str | None:
    for pattern in spec.must_match:
        if not re.search(pattern, text):
            return f"does not match {pattern!r}"
    for pattern in spec.must_not_match:
        if re.search(pattern, text):
            return f"matches {pattern!r}"
    return None


def _confidence(spec: VerifySpec, _: ChatRequest, __: str, body: dict[str, Any]) -> str | None:
    if spec.min_mean_logprob is None:
        return None
    mean = mean_logprob(body)
    if mean is not None and mean < spec.min_mean_logprob:
        return f"mean token logprob {mean:.2f}, under {spec.min_mean_logprob:g}"
    return None


def judge_request(judge: JudgeSpec, request: ChatRequest, answer: str) -> ChatRequest:
    """What the judge is asked: the rubric, the question, the draft; a score as JSON."""
    question = request.last_user_text()
    return ChatRequest.model_validate(
        {
            "model": judge.model.label,
            "messages": [
                {
                    "role": "system",
                    "content": "You grade an answer to a user's request. Rubric: "
                    f"{judge.rubric}\nReply with JSON: a score from 0 (useless) to 10 (right "
                    "and complete).",
                },
                {"role": "user", "content": f"Request:\n{question}\n\nAnswer:\n{answer}"},
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "grade", "schema": JUDGE_SCHEMA, "strict": True},
            },
            "max_tokens": 50,
            "metadata": {"tenant": request.metadata.tenant},
        }
    )


def judge_verdict(judge: JudgeSpec, body: dict[str, Any]) -> Verdict:
    """The judge's answer as a verdict; an answer with no score rejects the draft."""
    try:
        score = float(json.loads(answer_text(body))["score"])
    except (ValueError, KeyError, TypeError):
        return Verdict(False, "the judge gave no score")
    if score < judge.min_score:
        return Verdict(False, f"judge score {score:g}, under {judge.min_score:g}")
    return Verdict(True, f"judge score {score:g}")
