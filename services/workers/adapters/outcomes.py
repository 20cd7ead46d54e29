"""Redis: the final outcome of every request, and who sends each delivery's answer.

A redelivered request, or one sent again with the same idempotency key, is answered again from
here without calling the model again. Only final outcomes are kept (an answer, or an error that
would come out the same again); after a retryable one (a deadline, a rate limit, every model
down) a resend gets a fresh try. Outcomes are kept under the routed request's ``outcome_key``
(scoped to the tenant or the producer), with the request's fingerprint: a resend under the same
key asking for something else is not answered with it. A *delivery*
is one record of a tier topic (``topic:partition:offset``). Before its answer is published the
worker notes, first come first kept, that it (``owner``, one id per worker process) sends it and
where. A worker that gets the same record again (after a crash, or while a worker the group gave
up on still works on it) finds the note and asks whether the note's owner is alive: every worker
holds a lease in Redis (``LEASE_MS``, renewed four times per lease) for as long as its event loop
runs. A living owner is still sending and is waited for, while the worker looks for the answer
on the topic (``services/workers/adapters/sent.py``); an owner whose lease ran out is gone, and
whatever it sent before it went is on the topic already, so the worker looks there once and,
finding nothing, takes the note over (compare and set: of two takers, one wins) and sends the
answer itself. An answer found on the topic marks the delivery sent, so a later redelivery of it
need not look again.

Fail-open: when Redis is unreachable the worker still serves requests (a redelivery then costs
a second model call and may answer twice) and says so in its log, once a minute at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, Redis

from services.common import telemetry

log = logging.getLogger(__name__)

OUTCOME_TTL_S = 24 * 3600  # the default of the worker setting outcome_ttl_s
# How long a worker counts as alive after it last renewed its lease. A process that is killed
# is known to be gone this long after its last renewal; the record's next owner gets it after the
# group's session timeout (6 s by default), so by then the lease has mostly run out already.
LEASE_MS = 6_000
_WARN_EVERY_S = 60.0
# compare and set: the note is replaced only if it is still the one the taker read
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
    return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Stored:
    """A final outcome kept for resends: the outcome's JSON, and the fingerprint of the request
    it answered (None: stored without one)."""

    payload: bytes
    fingerprint: str | None


@dataclass(frozen=True, slots=True)
class Sending:
    """``owner`` began publishing a delivery's answer to ``topic`` at ``at_ms`` (epoch ms);
    ``done``: the answer was found there since."""

    topic: str
    at_ms: int
    owner: str
    done: bool = False
    raw: bytes = field(default=b"", repr=False, compare=False)  # the note as stored


class OutcomeStore(Protocol):
    owner: str  # this worker process

    async def lookup(
        self, key: str, request_id: str, delivery: str
    ) -> tuple[Stored | None, Sending | None]:
        """The outcome stored under ``key``, and whether this delivery has begun sending it."""
        ...

    async def put(
        self, key: str, stored: Stored, request_id: str, delivery: str, topic: str
    ) -> Sending | None:
        """Store a final outcome under ``key`` and note that this worker sends ``delivery``'s
        answer to ``topic``; if the delivery was noted already, return that note (which stays)."""
        ...

    async def sending(self, request_id: str, delivery: str, topic: str) -> Sending | None:
        """Note that this worker sends ``delivery``'s answer to ``topic``, unless it was noted
        already: then return that note."""
        ...

    async def note(self, request_id: str, delivery: str) -> Sending | None:
        """The delivery's note as it stands now."""
        ...

    async def sent(self, request_id: str, delivery: str) -> None:
        """Mark ``delivery``'s answer as found on its topic."""
        ...

    async def alive(self, owner: str) -> bool:
        """Does ``owner``'s lease still run?"""
        ...

    async def take_over(self, request_id: str, delivery: str, note: Sending) -> bool:
        """Make this worker the owner of ``note`` if it is still the delivery's note."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class RedisOutcomeStore:
    def __init__(
        self,
        url: str,
        prefix: str,
        name: str,
        outcome_ttl_s: int = OUTCOME_TTL_S,
        outcome_url: str | None = None,
        password: str | None = None,
    ) -> None:
        self._redis = _client(url, password)  # leases and notes: must never be evicted
        # outcomes: a cache, which a Redis of its own may evict (losing one costs a model call)
        self._cache = _client(outcome_url, password) if outcome_url else self._redis
        self._outcome = f"{prefix}:outcome:"
        self._fingerprint = f"{prefix}:fingerprint:"
        self._ttl_s = outcome_ttl_s
        self._notes = f"{prefix}:sent:"
        self._done = f"{prefix}:done:"
        self._lease = f"{prefix}:alive:"
        self.owner = f"{name}-{uuid.uuid4().hex[:12]}"
        self._renewing: asyncio.Task[None] | None = None
        self._warned_at = -_WARN_EVERY_S
        self.unavailable = 0  # calls that found Redis unreachable

    def _unavailable(self, operation: str, what: str, exc: Exception) -> None:
        self.unavailable += 1
        telemetry.redis_failed("worker", operation)
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "redis unavailable (%s so far), %s: %s; failing open until it is back",
                self.unavailable,
                what,
                exc,
            )

    async def start(self) -> None:
        """Take out this worker's lease (before any note names it) and keep renewing it."""
        await self._renew()
        self._renewing = asyncio.create_task(self._keep_renewing(), name="outcome-lease")

    async def _renew(self) -> None:
        try:
            await self._redis.set(self._lease + self.owner, b"1", px=LEASE_MS)
        except Exception as exc:
            self._unavailable("lease", "lease not renewed", exc)

    async def _keep_renewing(self) -> None:
        while True:
            await asyncio.sleep(LEASE_MS / 4000)
            await self._renew()

    def _keys(self, request_id: str, delivery: str) -> tuple[str, str]:
        return f"{self._notes}{request_id}:{delivery}", f"{self._done}{request_id}:{delivery}"

    async def lookup(
        self, key: str, request_id: str, delivery: str
    ) -> tuple[Stored | None, Sending | None]:
        try:
            kept = (self._outcome + key, self._fingerprint + key)
            if self._cache is self._redis:
                outcome, fingerprint, note, done = await self._redis.mget(
                    *kept, *self._keys(request_id, delivery)
                )
            else:
                (outcome, fingerprint), (note, done) = await asyncio.gather(
                    self._cache.mget(*kept), self._redis.mget(*self._keys(request_id, delivery))
                )
        except Exception as exc:
            self._unavailable("lookup", "redeliveries are not recognised", exc)
            return None, None
        stored = None
        if isinstance(outcome, bytes):
            fp = fingerprint.decode() if isinstance(fingerprint, bytes) else None
            stored = Stored(outcome, fp)
        return stored, _sending(note, done)

    async def note(self, request_id: str, delivery: str) -> Sending | None:
        try:
            note, done = await self._redis.mget(*self._keys(request_id, delivery))
        except Exception as exc:
            self._unavailable("note", "note not read", exc)
            return None
        return _sending(note, done)

    async def put(
        self, key: str, stored: Stored, request_id: str, delivery: str, topic: str
    ) -> Sending | None:
        try:
            async with self._cache.pipeline(transaction=False) as pipe:
                pipe.set(self._outcome + key, stored.payload, ex=self._ttl_s)
                # (none to store: the fingerprint is compared only when both sides have one)
                if stored.fingerprint:
                    pipe.set(self._fingerprint + key, stored.fingerprint, ex=self._ttl_s)
                if self._cache is self._redis:
                    self._note(pipe, request_id, delivery, topic)
                    *_, earlier = await pipe.execute()
                else:
                    await pipe.execute()
                    return await self.sending(request_id, delivery, topic)
        except Exception as exc:
            self._unavailable("put", "outcome not stored", exc)
            return None
        return _sending(earlier, None)

    async def sending(self, request_id: str, delivery: str, topic: str) -> Sending | None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                self._note(pipe, request_id, delivery, topic)
                (earlier,) = await pipe.execute()
        except Exception as exc:
            self._unavailable("sending", "delivery not noted", exc)
            return None
        return _sending(earlier, None)

    def _note(self, pipe: Any, request_id: str, delivery: str, topic: str) -> None:
        """SET NX GET: the first note of a delivery stays; a later one gets it back (without its
        sent mark, which only a search sets: the caller looks for the answer anyway)."""
        note = _encode(topic, int(time.time() * 1000), self.owner)
        pipe.set(self._keys(request_id, delivery)[0], note, ex=self._ttl_s, nx=True, get=True)

    async def sent(self, request_id: str, delivery: str) -> None:
        try:
            await self._redis.set(self._keys(request_id, delivery)[1], b"1", ex=self._ttl_s)
        except Exception as exc:
            self._unavailable("sent", "answer not marked sent", exc)

    async def alive(self, owner: str) -> bool:
        try:
            return bool(await self._redis.exists(self._lease + owner))
        except Exception as exc:
            self._unavailable("alive", "owner's lease not read", exc)
            return False

    async def take_over(self, request_id: str, delivery: str, note: Sending) -> bool:
        mine = _encode(note.topic, note.at_ms, self.owner)  # the search window stays the first's
        try:
            key = self._keys(request_id, delivery)[0]
            taken = await self._redis.eval(  # type: ignore[misc]
                _TAKE_OVER, 1, key, note.raw, mine, self._ttl_s
            )
        except Exception as exc:
            self._unavailable("take_over", "note not taken over", exc)
            return True
        return bool(taken)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            telemetry.redis_failed("worker", "ping")
            return False

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
            self._renewing = None
            with contextlib.suppress(Exception):  # gone now: nobody need wait out the lease
                await self._redis.delete(self._lease + self.owner)
        await self._redis.aclose()
        if self._cache is not self._redis:
            await self._cache.aclose()


def _client(url: str, password: str | None = None) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=64,
        timeout=2,
        socket_timeout=2,
        socket_connect_timeout=2,
        password=password,  # never inside the URL (services/common/settings.py)
    )
    return Redis.from_pool(pool)  # owns the pool: aclose() disconnects it


def _encode(topic: str, at_ms: int, owner: str) -> bytes:
    return json.dumps({"topic": topic, "at_ms": at_ms, "owner": owner}).encode()


def _sending(note: Any, done: Any) -> Sending | None:
    if not isinstance(note, bytes):
        return None
    fields = json.loads(note)
    return Sending(
        fields["topic"], fields["at_ms"], fields.get("owner", ""), isinstance(done, bytes), note
    )
