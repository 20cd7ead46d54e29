"""Routing: classify a request, stamp it, publish it to its tier; match answers to callers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from schemas.control import CapturedPayload
from schemas.topics import Topics
from schemas.v1 import CancelRequest, ChatRequest, Outcome, RoutedRequest, StreamChunk
from services.common import telemetry
from services.common.capabilities import MissingCapability, TierCapabilities, largest_window
from services.common.capture import input_record
from services.common.control import LiveExperiments
from services.common.kafka import Outgoing, Publisher
from services.common.routing_config import LoadedConfig, TierSpec
from services.router.domain.classify import (
    PINNED,
    Decision,
    Pending,
    classify,
    first_stage,
    settle,
)
from services.router.domain.images import MAX_IMAGE_BYTES, check_images
from services.router.stage import SemanticStage

log = logging.getLogger(__name__)
FITS_CONTEXT = "fits_context"  # the rule of a request moved to a tier whose models it fits
_ENVELOPE = set(RoutedRequest.model_fields) - {"request"}  # every field but the request


def idempotent_request_id(tenant: str | None, key: str) -> str:
    """Retries that carry the same key get the same id, so workers answer them from the cache."""
    digest = hashlib.sha256(f"{tenant or ''}\x00{key}".encode()).hexdigest()[:32]
    return f"sbr-idem-{digest}"


def outcome_key(scope: str | bytes | None, request_id: str) -> str:
    """Where a request's final outcome is kept: its id within ``scope`` (the tenant, or the
    Kafka producer's record key), so two producers that pick the same id never share answers."""
    raw = scope if isinstance(scope, bytes) else (scope or "").encode()
    digest = hashlib.sha256(raw + b"\x00" + request_id.encode()).hexdigest()[:32]
    return f"oc-{digest}"


def fingerprint(request: ChatRequest) -> str:
    """Hash of what was asked: a resend under the same key asking for something else is refused
    instead of answered with the first request's outcome. The id, the key, the deadline and the
    priority say how to deliver, not what: a resend after a 504 may give itself longer, and a
    streamed request resent whole (or the other way) is answered from the same outcome."""
    content = request.model_dump_json(
        exclude={
            "request_id": True,
            "stream": True,  # the same answer, streamed or whole
            "stream_options": True,
            "metadata": {"idempotency_key", "deadline_ms", "priority"},
        }
    )
    return hashlib.sha256(content.encode()).hexdigest()[:32]


def payload_fingerprint(payload: bytes) -> str:
    """``fingerprint`` of a Kafka producer's request: its bytes. A producer's resend repeats
    them; hashing them costs the ingress a microsecond, where re-serialising cost it tens."""
    return hashlib.sha256(payload).hexdigest()[:32]


class Router:
    def __init__(
        self,
        config: LoadedConfig,
        topics: Topics,
        publisher: Publisher,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        live: LiveExperiments | None = None,
        semantic: SemanticStage | None = None,
    ) -> None:
        self.config = config
        self.semantic = semantic
        self.topics = topics
        self.publisher = publisher
        self.max_image_bytes = max_image_bytes
        # the shares of the experiments in force (the control topic's); none: the config's
        self.live = live or LiveExperiments(config, {})
        self._tier_capabilities: dict[tuple[str, str], TierCapabilities] = {}
        self.capture_failures = 0  # captured inputs that could not be made (logged)

    def begin(self, request: ChatRequest) -> tuple[Decision | Pending, LoadedConfig]:
        """The rules before the semantic stage, with the config they read: one config for
        the whole decision, whatever comes in meanwhile. Raises ``UnknownModel``."""
        config = self.config
        return first_stage(request, config), config

    async def finish(self, pending: Pending, config: LoadedConfig) -> Decision:
        """The semantic stage (when this router runs one), then the rules after it, then the
        default."""
        match = None
        if self.semantic is not None and config.spec.semantic is not None:
            match = await self.semantic.match(pending, config)
        return settle(pending, config, match)

    async def decide(self, request: ChatRequest) -> tuple[Decision, LoadedConfig]:
        """The tier for ``request`` and the config that chose it (``begin``, then ``finish``)."""
        started = time.perf_counter()
        stage, config = self.begin(request)
        if isinstance(stage, Pending):
            stage = await self.finish(stage, config)
        telemetry.decided(time.perf_counter() - started)
        return stage, config

    def route(
        self,
        request: ChatRequest,
        reply_to: str,
        *,
        caller_waits: bool = True,
        scope: str | bytes | None = None,
        content_hash: str | None = None,
        decided: tuple[Decision, LoadedConfig] | None = None,
    ) -> RoutedRequest:
        """Classify ``request`` and stamp what a worker needs: tier, rule, config, deadline.

        The deadline is the request's own ``deadline_ms`` when it names one. Otherwise a caller
        that waits (HTTP) gets the tier's ``request_timeout_s``, while a job from the Kafka
        ingress gets none: it waits in its tier's queue as long as the backlog takes, and only
        each model attempt is timed (``timeout_s``). A queued job is never dropped for age.

        A request the rules sent to a tier with an experiment running is assigned a variant
        (``LiveExperiments.tag``); one that pinned a model is not.

        ``scope`` and ``content_hash`` make the outcome key and the fingerprint (see
        ``outcome_key``, ``fingerprint``). ``decided`` is what ``decide`` returned; without it
        the request goes by the rules alone. Raises ``UnknownModel``, ``BadImage`` or
        ``MissingCapability`` for a request no tier can take.
        """
        check_images(request, self.max_image_bytes)
        if decided is None:
            config = self.config
            decision = classify(request, config)
        else:
            decision, config = decided
        tier = config.tier(decision.tier)
        try:
            self._capabilities(config.hash, decision.tier, tier).check(request, decision.pinned)
        except MissingCapability as exc:
            if exc.capability != "context_window" or decision.rule in (PINNED, "forced"):
                raise  # a tier or model the caller named is not swapped for another
            decision = self._fitting(config, request, decision, exc)
            tier = config.tier(decision.tier)
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
            route_score=decision.score,
            config_hash=config.hash,
            pinned=decision.pinned,
            routed_at=now,
            deadline_at=None if budget_s is None else now + timedelta(seconds=budget_s),
            reply_to=reply_to,
            outcome_key=outcome_key(scope or request.metadata.tenant, request.request_id),
            fingerprint=content_hash,
            experiment=None if decision.pinned else self.live.tag(decision.tier, request),
            capture=config.captures(request.metadata.tenant, decision.rule),
        )

    def _fitting(
        self, config: LoadedConfig, request: ChatRequest, chosen: Decision, exc: MissingCapability
    ) -> Decision:
        """A request too long for every model of its tier goes to the first tier, in the
        config's order, that has a model it fits (rule ``fits_context``); with none anywhere it
        is refused, naming the largest context window there is."""
        for name in config.tier_names:
            if name == chosen.tier:
                continue
            try:
                self._capabilities(config.hash, name, config.tier(name)).check(request)
            except MissingCapability:
                continue
            log.info(
                "request %s: too long for tier %s, sent to %s",
                request.request_id,
                chosen.tier,
                name,
            )
            return Decision(name, FITS_CONTEXT, score=chosen.score)
        raise MissingCapability(
            chosen.tier, "context_window", exc.models, exc.prompt_tokens, largest_window(config)
        ) from exc

    def apply_config(self, config: LoadedConfig) -> None:
        """Route the next requests with ``config`` (each request reads it once)."""
        self.config = config
        self.live.config = config
        self._tier_capabilities = {}

    def _capabilities(self, config_hash: str, name: str, tier: TierSpec) -> TierCapabilities:
        known = self._tier_capabilities.get((config_hash, name))
        if known is None:
            known = self._tier_capabilities[(config_hash, name)] = TierCapabilities(name, tier)
        return known

    async def publish(self, routed: RoutedRequest) -> None:
        send = self.publisher.publish(self.topics.tier(routed.tier), routed, key=routed.request_id)
        if not routed.capture:
            await send
            return
        kept = self._input_record(routed)
        if kept is None:
            await send
            return
        await asyncio.gather(
            send, self.publisher.publish(self.topics.payloads, kept, key=routed.request_id)
        )

    def _input_record(self, routed: RoutedRequest) -> CapturedPayload | None:
        """The captured input, redacted here: no captured text leaves the router unredacted.
        None (logged, counted) if it cannot be made: capture never costs a request its answer."""
        try:
            return input_record(routed.request, routed.tier, routed.rule, routed.config_hash)
        except Exception:
            self.capture_failures += 1
            log.exception("capture of request %s failed; the request goes on", routed.request_id)
            return None

    def captured(self, routed: RoutedRequest) -> Outgoing | None:
        """The captured input of ``routed`` as a message for a batch publish, if it is captured."""
        kept = self._input_record(routed) if routed.capture else None
        if kept is None:
            return None
        return Outgoing(
            self.topics.payloads, kept.model_dump_json().encode(), routed.request_id.encode()
        )

    async def cancel(self, request_id: str) -> None:
        """Tell the workers the client of streamed ``request_id`` left (services/workers/cancels.py)."""
        cancel = CancelRequest(request_id=request_id)
        await self.publisher.publish(self.topics.cancel, cancel, key=request_id)

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


class KeyReused(Exception):
    """An idempotency key sent again with a different request while the first still waits."""


@dataclass
class _Waiting:
    future: asyncio.Future[Outcome]
    fingerprint: str | None
    callers: int = 1
    # streamed callers: each gets every chunk of the request (StreamRelay picks what to show)
    followers: list[asyncio.Queue[StreamChunk]] = field(default_factory=list)


class PendingReplies:
    """Futures of HTTP callers waiting for their answer, by request id.

    Callers that share an idempotency key share one future: the first publishes, the others
    join. The future stays until the last of them leaves, so a joined caller still gets the
    answer when the first one goes away.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, _Waiting] = {}
        # progress, for readiness: when the last answer came, when the current wait began
        self.answered_at = 0.0
        self.waiting_since = 0.0

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(
        self, request_id: str, fingerprint: str | None = None
    ) -> tuple[asyncio.Future[Outcome], bool]:
        """The future for ``request_id``, and whether this caller created it (must publish).
        Every call is matched by one ``leave``. Raises ``KeyReused`` when a caller with another
        fingerprint waits on the id."""
        existing = self._waiting.get(request_id)
        if existing is not None and not existing.future.done():
            if existing.fingerprint != fingerprint:
                raise KeyReused(request_id)
            existing.callers += 1
            return existing.future, False
        loop = asyncio.get_running_loop()
        if not self._waiting:
            self.waiting_since = loop.time()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._waiting[request_id] = _Waiting(future, fingerprint)
        return future, True

    def follow(self, request_id: str, queue: asyncio.Queue[StreamChunk]) -> None:
        """``queue`` gets the chunks of ``request_id`` from now on (call after ``expect``)."""
        waiting = self._waiting.get(request_id)
        if waiting is not None:
            waiting.followers.append(queue)

    def callers(self, request_id: str) -> int:
        """How many callers wait on ``request_id`` (0: none)."""
        waiting = self._waiting.get(request_id)
        return 0 if waiting is None else waiting.callers

    def unfollow(self, request_id: str, queue: asyncio.Queue[StreamChunk]) -> None:
        waiting = self._waiting.get(request_id)
        if waiting is not None and queue in waiting.followers:
            waiting.followers.remove(queue)

    def chunk(self, chunk: StreamChunk) -> bool:
        """Hand a streamed answer's chunk to the callers following it; False if none is."""
        self.answered_at = asyncio.get_running_loop().time()  # progress, for readiness
        waiting = self._waiting.get(chunk.request_id)
        if waiting is None or not waiting.followers:
            return False
        for queue in waiting.followers:
            queue.put_nowait(chunk)
        return True

    def resolve(self, outcome: Outcome) -> bool:
        self.answered_at = asyncio.get_running_loop().time()
        waiting = self._waiting.pop(outcome.request_id, None)
        if waiting is None or waiting.future.done():
            return False  # a late or repeated answer nobody waits for any more
        waiting.future.set_result(outcome)
        return True

    def leave(self, request_id: str, future: asyncio.Future[Outcome]) -> None:
        """A caller of ``expect`` stops waiting; the last one to leave removes the future."""
        waiting = self._waiting.get(request_id)
        if waiting is None or waiting.future is not future:
            return
        waiting.callers -= 1
        if waiting.callers <= 0 or future.done():
            del self._waiting[request_id]

    def fail(self, request_id: str, future: asyncio.Future[Outcome], exc: Exception) -> None:
        """The request was not sent: the callers who joined it get ``exc`` rather than wait."""
        waiting = self._waiting.get(request_id)
        if waiting is not None and waiting.future is future:
            del self._waiting[request_id]
        if not future.done():
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting

    def stalled_for(self, now: float) -> float:
        """How long callers have waited with no answer arriving at all (0 when nobody waits)."""
        if not self._waiting:
            return 0.0
        return now - max(self.answered_at, self.waiting_since)

    def fail_all(self, exc: BaseException) -> None:
        for waiting in self._waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(exc)
        self._waiting.clear()
