"""Comparing a shadow candidate's answer with the baseline's. Pure.

The default similarity is rapidfuzz's normalised Indel similarity of the two texts (1 - the
edits needed to turn one into the other, over their lengths): cheap (microseconds for answers of
a few kB), symmetric, 1 for equal texts and near 0 for unrelated ones. A judge model, when the
experiment names one, is asked for a score instead (``judge_request``, ``judge_score``).

Each comparison also names the request's slices (``slices_of``), which `switchboard replay
report` groups by: a candidate that holds up on short triage may still fail long conversations.
"""

from __future__ import annotations

import json
import re
import string
from datetime import datetime

from rapidfuzz.distance import Indel

from schemas.control import SHADOW_TEXT_CHARS, BaselineAnswer
from schemas.v1 import ChatRequest, TextPart
from services.common.capture import IMAGE_MARK

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


# --- slices ---------------------------------------------------------------------------------------

SHORT = "short"
LONG = "long"
LONG_CONVERSATION = "long conversation"
MULTIMODAL = "multimodal"
NOISY = "noisy or truncated"
SLICES = (SHORT, LONG, LONG_CONVERSATION, MULTIMODAL, NOISY)
SHORT_CHARS = 500  # the messages' text, all of it: at most this is short (~125 tokens)
LONG_CHARS = 8_000  # at least this is long (~2,000 tokens)
LONG_CONVERSATION_MESSAGES = 8
NOISE_SHARE = 0.2  # of the last user text's non-space characters: neither letters, digits nor
NOISE_RUN = 8  # ASCII punctuation (mojibake, emoji floods, control characters); or one character
_RUN = re.compile(r"(\S)\1{" + str(NOISE_RUN - 1) + ",}")  # repeated this many times in a row
_PLAIN = frozenset(string.punctuation)


def noisy(text: str) -> bool:
    """Text a model is likely to stumble on: many odd characters, or one hammered key."""
    seen = [c for c in text if not c.isspace()]
    if not seen:
        return False
    odd = sum(1 for c in seen if not (c.isalnum() or c in _PLAIN))
    return odd / len(seen) >= NOISE_SHARE or _RUN.search(text) is not None


def _has_images(request: ChatRequest) -> bool:
    """Image parts, or the mark a captured input keeps in their place."""
    for message in request.messages:
        if message.image_count():
            return True
        if isinstance(message.content, list) and any(
            isinstance(p, TextPart) and p.text == IMAGE_MARK for p in message.content
        ):
            return True
    return False


def slices_of(request: ChatRequest, baseline_tokens_out: int) -> list[str]:
    """The slices a request is in: ``short`` or ``long`` by the length of all its messages'
    text (neither in between), ``long conversation`` from 8 messages, ``multimodal`` with an
    image, and ``noisy or truncated`` when its last user text is noisy or the baseline's answer
    used every token the request allowed (it was cut off)."""
    chars = sum(len(m.text()) for m in request.messages)
    found = []
    if chars <= SHORT_CHARS:
        found.append(SHORT)
    elif chars >= LONG_CHARS:
        found.append(LONG)
    if len(request.messages) >= LONG_CONVERSATION_MESSAGES:
        found.append(LONG_CONVERSATION)
    if _has_images(request):
        found.append(MULTIMODAL)
    cap = request.token_cap
    if noisy(request.last_user_text()) or (cap is not None and baseline_tokens_out >= cap):
        found.append(NOISY)
    return found
