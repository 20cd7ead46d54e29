"""Routing: classify a request, stamp it, publish it to its tier; match answers to callers."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

from schemas.topics import Topics
from schemas.v1 import ChatRequest, Outcome, RoutedRequest
from services.common.kafka import Outgoing, Publisher
from services.common.routing_config import LoadedConfig
from services.router.domain.classify import classify
from services.router.domain.images import MAX_IMAGE_BYTES, check_images

_ENVELOPE = set(RoutedRequest.model_fields) - {"request"}  # every field but the request


def idempotent_request_id(tenant: str | None, key: str) -> str:
    """Retries that carry the same key get the same id, so workers answer them from the cache."""
    digest = hashlib.sha256(f"{tenant or ''}\x00{key}".encode()).hexdigest()[:32]
    return f"sbr-idem-{digest}"


class Router:
    def __init__(
        self,
        config: LoadedConfig,
        topics: Topics,
        publisher: Publisher,
        max_image_bytes: int = MAX_IMAGE_BYTES,
    ) -> None:
        self.config = config
        self.topics = topics
        self.publisher = publisher
        self.max_image_bytes = max_image_bytes

    def route(
        self, request: ChatRequest, reply_to: str, *, caller_waits: bool = True
    ) -> RoutedRequest:
        """Classify ``request`` and stamp what a worker needs: tier, rule, config, deadline.

        The deadline is the request's own ``deadline_ms`` when it names one. Otherwise a caller
        that waits (HTTP) gets the tier's ``request_timeout_s``, while a job from the Kafka
        ingress gets none: it waits in its tier's queue as long as the backlog takes, and only
        each model attempt is timed (``timeout_s``). A queued job is never dropped for age.

        Raises ``UnknownModel`` or ``BadImage`` for a request no tier can take.
        """
        check_images(request, self.max_image_bytes)
        decision = classify(request, self.config)
        tier = self.config.tier(decision.tier)
        now = datetime.now(UTC)
        budget_s: float | None = None
        if request.metadata.deadline_ms:
            budget_s = request.metadata.deadline_ms / 1000
        elif caller_waits:
            budget_s = tier.request_timeout_s
        return RoutedRequest(
            request=request,
            tier=decision.tier,
            rule=decision.rule,
            config_hash=self.config.hash,
            routed_at=now,
            deadline_at=None if budget_s is None else now + timedelta(seconds=budget_s),
            reply_to=reply_to,
        )

    async def publish(self, routed: RoutedRequest) -> None:
        await self.publisher.publish(self.topics.tier(routed.tier), routed, key=routed.request_id)

    def encode(self, routed: RoutedRequest, raw_request: bytes | None = None) -> Outgoing:
        """``routed`` as a message for a batch publish: same topic and key as ``publish``.

        ``raw_request`` is the producer's JSON that ``routed.request`` was parsed from. When it
        names its request id, it goes into the routed message as is and only the envelope is
        serialised: a worker parsing it with the same model gets the same request, and
        re-serialising a request just parsed was a fifth of an ingress decision's CPU. Without
        an id (the router generated one) the request is serialised as usual.
        """
        topic, key = self.topics.tier(routed.tier), routed.request_id.encode()
        if raw_request is None or "request_id" not in routed.request.model_fields_set:
            return Outgoing(topic, routed.model_dump_json().encode(), key)
        envelope = routed.model_dump_json(include=_ENVELOPE).encode()
        return Outgoing(topic, b'{"request":' + raw_request + b"," + envelope[1:], key)


class PendingReplies:
    """Futures of HTTP callers waiting for their answer, by request id."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Outcome]] = {}
        # progress, for readiness: when the last answer came, when the current wait began
        self.answered_at = 0.0
        self.waiting_since = 0.0

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, request_id: str) -> tuple[asyncio.Future[Outcome], bool]:
        """The future for ``request_id``, and whether this caller created it (must publish)."""
        existing = self._waiting.get(request_id)
        if existing is not None and not existing.done():
            return existing, False
        loop = asyncio.get_running_loop()
        if not self._waiting:
            self.waiting_since = loop.time()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._waiting[request_id] = future
        return future, True

    def resolve(self, outcome: Outcome) -> bool:
        self.answered_at = asyncio.get_running_loop().time()
        future = self._waiting.pop(outcome.request_id, None)
        if future is None or future.done():
            return False  # a late or repeated answer nobody waits for any more
        future.set_result(outcome)
        return True

    def forget(self, request_id: str, future: asyncio.Future[Outcome]) -> None:
        if self._waiting.get(request_id) is future:
            del self._waiting[request_id]

    def stalled_for(self, now: float) -> float:
        """How long callers have waited with no answer arriving at all (0 when nobody waits)."""
        if not self._waiting:
            return 0.0
        return now - max(self.answered_at, self.waiting_since)

    def fail_all(self, exc: BaseException) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(exc)
        self._waiting.clear()
