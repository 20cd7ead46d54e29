"""Is a request's input noisy, and why: the decision matrix's error rate on noisy inputs.

A request counts as noisy when its caller says so (``metadata.tags.noisy``), or when its last
user message looks:

- ``truncated``: cut off mid-way: an open code fence, JSON-looking text whose brackets never
  close, or a trailing ellipsis or backslash;
- ``garbled``: characters that are not text: U+FFFD replacement characters, control characters,
  or UTF-8 read as Latin-1 (``Ã©``, ``â€™``), over ``GARBLED_SHARE`` of it;
- ``very_long``: over ``VERY_LONG_CHARS`` characters in all its messages (about 8,000 tokens).

Pure and cheap: a few scans of the text, once per request.
"""

from __future__ import annotations

import re

from schemas.v1 import ChatRequest

VERY_LONG_CHARS = 32_000
GARBLED_SHARE = 0.02
# tags.noisy values that do not mean "noisy"
_FALSE = frozenset({"", "0", "false", "no"})
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
# UTF-8 read as Latin-1 / cp1252: the lead byte of a 2- or 3-byte sequence as a character
_MOJIBAKE = re.compile(r"[ÃÂ][\x80-\xbf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u2013-\u203a]|â€")
_OPENERS = {"{": "}", "[": "]"}


def input_noise(request: ChatRequest) -> str:
    """The reasons, comma-separated in a fixed order, or '' for a clean input."""
    reasons = []
    tag = request.metadata.tags.get("noisy")
    if tag is not None and tag.strip().lower() not in _FALSE:
        reasons.append("tagged")
    text = request.last_user_text()
    if truncated(text):
        reasons.append("truncated")
    if garbled(text):
        reasons.append("garbled")
    if sum(len(m.text()) for m in request.messages) > VERY_LONG_CHARS:
        reasons.append("very_long")
    return ",".join(reasons)


def truncated(text: str) -> bool:
    body = text.rstrip()
    if not body:
        return False
    if body.count("```") % 2:
        return True
    if body.endswith(("...", "…", "\\")):
        return True
    closer = _OPENERS.get(body[0])
    return closer is not None and _depth(body) > 0


def _depth(text: str) -> int:
    """How many brackets are still open at the end (strings skipped, as JSON has them)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return depth + in_string


def garbled(text: str) -> bool:
    if not text:
        return False
    bad = len(_CONTROL.findall(text)) + 2 * len(_MOJIBAKE.findall(text))
    return bad >= 3 and bad > GARBLED_SHARE * len(text)
