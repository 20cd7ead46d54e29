"""Prompt tokens: litellm's default tokenizer, exact for short texts, sampled for long ones."""

from __future__ import annotations

import pytest

from services.common import tokens


def test_counts_come_from_the_tokenizer() -> None:
    assert tokens.exact()  # litellm ships the BPE file: no download, no fallback
    assert tokens.count("") == 0
    assert tokens.count("hello world") == 2
    assert tokens.count("The quick brown fox jumps over the lazy dog.") == 10


@pytest.mark.parametrize(
    "piece",
    [
        "The contract renews each year unless either party gives notice. ",
        "def f(x):\n    return {k: v for k, v in x.items() if v}\n",
        "Der Vertrag verlängert sich jährlich, sofern keine Kündigung erfolgt. ",
    ],
)
def test_a_long_text_is_estimated_from_its_ends_within_a_few_percent(piece: str) -> None:
    text = piece * (3 * tokens.EXACT_CHARS // len(piece))
    assert len(text) > tokens.EXACT_CHARS
    exact = len(tokens._encoding().encode_ordinary(text))  # type: ignore[union-attr]
    assert abs(tokens.count(text) - exact) / exact < 0.03


def test_without_the_tokenizer_it_counts_characters_over_four(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tokens, "_encoding", lambda: None)
    assert tokens.count("x" * 41) == 11
    assert not tokens.exact()
