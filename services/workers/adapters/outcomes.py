"""Redis: the last outcome of every request, so a redelivered request is answered again
without calling the model again.

Fail-open: when Redis is unreachable the worker still serves requests (a redelivery then costs
a second model call) and says so in its log.
"""

from __future__ import annotations

import logging
from typing import Protocol

from redis.asyncio import BlockingConnectionPool, Redis

log = logging.getLogger(__name__)

OUTCOME_TTL_S = 24 * 3600


class OutcomeStore(Protocol):
    async def get(self, request_id: str) -> bytes | None: ...

    async def put(self, request_id: str, payload: bytes) -> None: ...

    async def close(self) -> None: ...


class RedisOutcomeStore:
    def __init__(self, url: str, prefix: str) -> None:
        pool = BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=2, socket_timeout=2, socket_connect_timeout=2
        )
        self._redis = Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        self._prefix = f"{prefix}:outcome:"

    async def get(self, request_id: str) -> bytes | None:
        try:
            value = await self._redis.get(self._prefix + request_id)
        except Exception as exc:
            log.warning("redis unavailable, de-duplication skipped: %s", exc)
            return None
        return value if isinstance(value, bytes) else None

    async def put(self, request_id: str, payload: bytes) -> None:
        try:
            await self._redis.set(self._prefix + request_id, payload, ex=OUTCOME_TTL_S)
        except Exception as exc:
            log.warning("redis unavailable, outcome not cached: %s", exc)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self._redis.aclose()
