"""Comparing a shadow candidate's answer with the baseline's. Pure.

The default similarity is rapidfuzz's normalised Indel similarity of the two texts (1 - the
edits needed to turn one into the other, over their lengths): cheap (microseconds for answers of
a few kB), symmetric, 1 for equal texts and near 0 for unrelated ones. A judge model, when the
experiment names one, is asked for a score instead (``judge_request``, ``judge_score``).
"""

from __future__ import annotations

import json
from datetime import datetime

from rapidfuzz.distance import Indel

from schemas.control import SHADOW_TEXT_CHARS, BaselineAnswer
from schemas.v1 import ChatRequest

JUDGE_SYSTEM = (
    "You compare two answers to the same request. Score how alike they are in meaning and in "
    "the facts they state, from 0 (unrelated or contradictory) to 1 (equivalent). Answer with "
    'JSON only: {"score": <number>}.'
)
JUDGE_SCHEMA = {
    "name": "similarity",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
        "additionalProperties": False,
    },
}
JUDGE_MAX_TOKENS = 50
JUDGE_QUESTION_CHARS = 4_000


def text_similarity(a: str, b: str) -> float:
    return float(Indel.normalized_similarity(a[:SHADOW_TEXT_CHARS], b[:SHADOW_TEXT_CHARS]))


def judge_request(request: ChatRequest, baseline: str, candidate: str) -> ChatRequest:
    """What the judge model is asked: the request's last user text and both answers."""
    question = request.last_user_text()[:JUDGE_QUESTION_CHARS]
    prompt = f"Request:\n{question}\n\nAnswer A:\n{baseline}\n\nAnswer B:\n{candidate}"
    return ChatRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": prompt},
            ],
            "response_format": {"type": "json_schema", "json_schema": JUDGE_SCHEMA},
            "max_tokens": JUDGE_MAX_TOKENS,
            "temperature": 0,
            "metadata": {"tenant": request.metadata.tenant} if request.metadata.tenant else {},
        }
    )


class JudgeUnreadable(ValueError):
    """The judge's answer is not ``{"score": <0..1>}``."""


def judge_score(text: str) -> float:
    try:
        score = json.loads(text)["score"]
    except (ValueError, KeyError, TypeError) as exc:
        raise JudgeUnreadable(f"the judge answered {text[:200]!r}") from exc
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
        raise JudgeUnreadable(f"the judge's score {score!r} is not a number in 0..1")
    return float(score)


def lag_s(baseline: BaselineAnswer, now: datetime) -> float:
    """How long the mirrored request waited since the tier answered it."""
    return (now - baseline.answered_at).total_seconds()
