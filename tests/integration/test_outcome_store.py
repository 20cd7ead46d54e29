"""The outcome store on real Redis: the TTL setting, and outcomes in a Redis of their own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.workers.adapters.outcomes import RedisOutcomeStore, Stored
from switchboard.embedded import free_port, start_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def cache_url(logs_dir: Path) -> Iterator[str]:
    """A second Redis, for outcomes alone."""
    port = free_port()
    child = start_redis(port, logs_dir)
    yield f"redis://127.0.0.1:{port}/0"
    child.stop()


async def test_outcomes_live_as_long_as_the_setting_says(redis_url: str) -> None:
    prefix = f"ttl-{uuid.uuid4().hex[:8]}"
    store = RedisOutcomeStore(redis_url, prefix, "w", outcome_ttl_s=120)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await store.put("k1", Stored(b"{}", "fp"), "req-1", "t:0:1", "results")
        for key in (
            f"{prefix}:outcome:k1",
            f"{prefix}:fingerprint:k1",
            f"{prefix}:sent:req-1:t:0:1",
        ):
            assert 110 <= await raw.ttl(key) <= 120, key
        stored, note = await store.lookup("k1", "req-1", "t:0:1")
        assert stored == Stored(b"{}", "fp") and note is not None and note.topic == "results"
    finally:
        await store.close()
        await raw.aclose()


async def test_with_an_outcome_redis_outcomes_go_there_and_notes_stay(
    redis_url: str, cache_url: str
) -> None:
    prefix = f"split-{uuid.uuid4().hex[:8]}"
    store = RedisOutcomeStore(redis_url, prefix, "w", outcome_url=cache_url)
    main, cache = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(cache_url)
    try:
        await store.start()
        assert await store.put("k2", Stored(b'{"a":1}', "fp"), "req-2", "t:0:2", "results") is None
        assert await cache.get(f"{prefix}:outcome:k2") == b'{"a":1}'
        assert await main.get(f"{prefix}:outcome:k2") is None
        assert await main.exists(f"{prefix}:sent:req-2:t:0:2")
        assert not await cache.exists(f"{prefix}:sent:req-2:t:0:2")
        assert await main.exists(f"{prefix}:alive:{store.owner}")  # the lease, never evictable
        stored, note = await store.lookup("k2", "req-2", "t:0:2")
        assert stored == Stored(b'{"a":1}', "fp") and note is not None
        # an evicted outcome is just a miss: the note still says the answer is being sent
        await cache.flushall()
        stored, note = await store.lookup("k2", "req-2", "t:0:2")
        assert stored is None and note is not None
    finally:
        await store.close()
        await main.aclose()
        await cache.aclose()
