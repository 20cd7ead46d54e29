"""Redis: the last outcome of every request, and which deliveries have had their answer sent.

A redelivered request is answered again from here without calling the model again. A *delivery*
is one record of a tier topic (``topic:partition:offset``); before its answer is published the
worker notes when and where it sends it, so a redelivery of the same record after a crash can look
for that answer on the topic instead of sending it twice (``services/workers/adapters/sent.py``).

Fail-open: when Redis is unreachable the worker still serves requests (a redelivery then costs
a second model call and may answer twice) and says so in its log, once a minute at most.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, Redis

log = logging.getLogger(__name__)

OUTCOME_TTL_S = 24 * 3600
_WARN_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class Sending:
    """A delivery's answer was about to be published to ``topic`` at ``at_ms`` (epoch ms)."""

    topic: str
    at_ms: int


class OutcomeStore(Protocol):
    async def lookup(self, request_id: str, delivery: str) -> tuple[bytes | None, Sending | None]:
        """The request's stored outcome, and whether this delivery has begun sending it."""
        ...

    async def put(
        self, request_id: str, payload: bytes, delivery: str, topic: str
    ) -> Sending | None:
        """Store the outcome and note that ``delivery`` is about to send it to ``topic``; if the
        delivery was noted already (by another owner of the record), return that note."""
        ...

    async def sending(self, request_id: str, delivery: str, topic: str) -> Sending | None:
        """Note that ``delivery`` is about to send to ``topic``, unless it was noted already:
        then return that note."""
        ...

    async def close(self) -> None: ...


class RedisOutcomeStore:
    def __init__(self, url: str, prefix: str) -> None:
        pool = BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=2, socket_timeout=2, socket_connect_timeout=2
        )
        self._redis = Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        self._outcome = f"{prefix}:outcome:"
        self._sent = f"{prefix}:sent:"
        self._warned_at = -_WARN_EVERY_S
        self.unavailable = 0  # calls that found Redis unreachable

    def _unavailable(self, what: str, exc: Exception) -> None:
        self.unavailable += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "redis unavailable (%s so far), %s: %s; failing open until it is back",
                self.unavailable,
                what,
                exc,
            )

    def _sent_key(self, request_id: str, delivery: str) -> str:
        return f"{self._sent}{request_id}:{delivery}"

    async def lookup(self, request_id: str, delivery: str) -> tuple[bytes | None, Sending | None]:
        try:
            outcome, sent = await self._redis.mget(
                self._outcome + request_id, self._sent_key(request_id, delivery)
            )
        except Exception as exc:
            self._unavailable("redeliveries are not recognised", exc)
            return None, None
        return (outcome if isinstance(outcome, bytes) else None), _sending(sent)

    async def put(
        self, request_id: str, payload: bytes, delivery: str, topic: str
    ) -> Sending | None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._outcome + request_id, payload, ex=OUTCOME_TTL_S)
                self._note(pipe, request_id, delivery, topic)
                _, earlier = await pipe.execute()
        except Exception as exc:
            self._unavailable("outcome not stored", exc)
            return None
        return _sending(earlier)

    async def sending(self, request_id: str, delivery: str, topic: str) -> Sending | None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                self._note(pipe, request_id, delivery, topic)
                (earlier,) = await pipe.execute()
        except Exception as exc:
            self._unavailable("delivery not noted", exc)
            return None
        return _sending(earlier)

    def _note(self, pipe: Any, request_id: str, delivery: str, topic: str) -> None:
        """SET NX GET: the first note of a delivery stays; a later one gets it back."""
        note = json.dumps({"topic": topic, "at_ms": int(time.time() * 1000)})
        pipe.set(self._sent_key(request_id, delivery), note, ex=OUTCOME_TTL_S, nx=True, get=True)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def _sending(note: Any) -> Sending | None:
    if not isinstance(note, bytes):
        return None
    fields = json.loads(note)
    return Sending(fields["topic"], fields["at_ms"])
