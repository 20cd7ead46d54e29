"""The semantic stage's encoder against sentence-transformers' own vectors, and its batcher."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.router.adapters.embedder import DIMENSIONS, Encoder, MicroBatcher

REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "minilm-reference.json").read_text())


@pytest.fixture(scope="module")
def encoder() -> Iterator[Encoder]:
    yield Encoder(max_tokens=256, precision="fp32")


def test_vectors_equal_sentence_transformers(encoder: Encoder) -> None:
    """Every reference sentence, the 600-word one cut at 256 tokens included."""
    got = encoder.encode(REFERENCE["sentences"])
    want = np.array(REFERENCE["vectors"], np.float32)
    assert got.shape == (len(want), DIMENSIONS)
    assert np.abs(got - want).max() < 1e-5


def test_int8_vectors_stay_near_the_float_ones_and_keep_their_order(encoder: Encoder) -> None:
    texts = REFERENCE["sentences"][:5]
    exact = encoder.encode(texts)
    quantized = Encoder(max_tokens=256).encode(texts)  # int8, the default
    assert np.abs(exact - quantized).max() > 1e-4  # it is another graph
    assert min(float(a @ b) for a, b in zip(exact, quantized, strict=True)) > 0.9
    # which sentence is nearest to which does not change
    assert ((exact @ exact.T).argsort() == (quantized @ quantized.T).argsort())[:, -2:].all()


def test_a_batch_gives_each_text_its_own_vector(encoder: Encoder) -> None:
    """Padding a short text to a long one's length changes nothing (the mask keeps it out)."""
    texts = REFERENCE["sentences"][:5]
    together = encoder.encode(texts)
    alone = np.concatenate([encoder.encode([t]) for t in texts])
    assert np.abs(together - alone).max() < 1e-5


def test_fewer_tokens_read_only_the_start() -> None:
    short = Encoder(max_tokens=16)
    long_text = REFERENCE["sentences"][5]
    start = " ".join(long_text.split()[:40])
    a, b = short.encode([long_text, start])
    assert float(a @ b) > 0.999
    assert short.encode([""]).shape == (1, DIMENSIONS)


async def test_queued_texts_are_encoded_together(encoder: Encoder) -> None:
    calls: list[int] = []

    def counting(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return encoder.encode(texts)

    batcher = MicroBatcher(counting, max_batch=8)
    texts = [f"question number {i} about my invoice" for i in range(20)]
    try:
        vectors = await asyncio.wait_for(
            asyncio.gather(*(batcher.encode(t) for t in texts)), timeout=60
        )
        assert calls == [8, 8, 4]  # all queued before the first batch began
        alone = encoder.encode(texts)
        assert np.abs(np.stack(vectors) - alone).max() < 1e-5
        # a text seen before is not encoded again; a lone new one goes at once, alone
        await asyncio.wait_for(batcher.encode(texts[3]), timeout=10)
        await asyncio.wait_for(batcher.encode("something else"), timeout=10)
        assert calls == [8, 8, 4, 1]
    finally:
        batcher.close()


async def test_an_encoder_failure_reaches_every_waiting_caller() -> None:
    def broken(texts: list[str]) -> np.ndarray:
        raise RuntimeError("encoder down")

    batcher = MicroBatcher(broken)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(batcher.encode("a"), batcher.encode("b"), return_exceptions=True),
            timeout=10,
        )
        assert all(isinstance(r, RuntimeError) for r in results)
    finally:
        batcher.close()


def test_texts_are_batched_with_texts_of_about_their_length() -> None:
    from services.router.adapters.embedder import _by_length

    lengths = [3, 40, 4, 41, 5, 120, 39, 3]
    groups = _by_length([[0] * n for n in lengths])
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        sizes = [lengths[i] for i in group]
        assert sizes == sorted(sizes)
        assert max(sizes) * len(sizes) <= 1.25 * sum(sizes) or len(sizes) == 1
    assert [lengths[i] for i in groups[-1]] == [120]  # the long one pads nobody
