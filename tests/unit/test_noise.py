"""Which inputs the decision matrix counts as noisy (services/workers/domain/noise.py)."""

from __future__ import annotations

import pytest

from schemas.v1 import ChatRequest
from services.workers.domain.noise import VERY_LONG_CHARS, input_noise


def _request(text: str, tags: dict[str, str] | None = None, system: str = "") -> ChatRequest:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return ChatRequest.model_validate(
        {"model": "auto", "messages": messages, "metadata": {"tags": tags or {}}}
    )


@pytest.mark.parametrize(
    ("text", "tags", "expected"),
    [
        ("How do I reset my password?", None, ""),
        ('Extract the fields: {"a": 1, "b": [1, 2]}', None, ""),
        ("plain text", {"noisy": "true"}, "tagged"),
        ("plain text", {"noisy": "false"}, ""),
        ("plain text", {"noisy": "0"}, ""),
        ("Fix this:\n```python\ndef f(x):\n    return x +", None, "truncated"),
        ('{"order": 48213, "items": [{"sku": "A-1", "qty": 2}, {"sku": "B', None, "truncated"),
        ('{"text": "a } inside a string", "n": 1}', None, ""),
        ("Summarise the meeting where we decided...", None, "truncated"),
        (
            "I ordered the caf\u00c3\u00a9 set and the \u00e2\u20ac\u0153deluxe\u00e2\u20ac\u009d one",
            None,
            "garbled",
        ),
        ("refund \ufffd\ufffd\ufffd\ufffd order 123", None, "garbled"),
        (
            "one caf\u00c3\u00a9 in a long clean sentence " + "about nothing much at all " * 20,
            None,
            "",
        ),
        ("x\x00y\x01z\x02 broken bytes", {"noisy": "yes"}, "tagged,garbled"),
    ],
)
def test_reasons(text: str, tags: dict[str, str] | None, expected: str) -> None:
    assert input_noise(_request(text, tags)) == expected


def test_very_long_counts_every_message() -> None:
    half = "word " * (VERY_LONG_CHARS // 10)
    assert input_noise(_request(half)) == ""
    assert input_noise(_request(half + "!", system=half + half)) == "very_long"
