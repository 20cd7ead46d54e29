"""Kafka handlers of the router: batches from the ingress topic, and this instance's reply topic."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import ConsumerRecord
from pydantic import TypeAdapter, ValidationError

from schemas.v1 import ChatError, ChatRequest, Reply, StreamChunk
from services.common import telemetry
from services.common.capabilities import MissingCapability
from services.common.deadletter import describe, from_record
from services.common.kafka import BatchPublisher, Outgoing, Publisher
from services.common.routing_config import LoadedConfig
from services.router.domain.classify import Decision, Pending, UnknownModel
from services.router.domain.images import BadImage
from services.router.service import PendingReplies, Router, payload_fingerprint

log = logging.getLogger(__name__)
_REPLY: TypeAdapter[Reply] = TypeAdapter(Reply)


def _request_id_of(payload: bytes | None) -> str | None:
    """The producer's request id, if the message is JSON enough to have one."""
    try:
        value = json.loads(payload or b"").get("request_id")
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, too deep
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 200 else None


class NotStreamed(ValueError):
    """``stream: true`` on the Kafka ingress, which answers with one outcome."""


class TooLarge(ValueError):
    """A request over the size the router accepts."""


@dataclass
class _Begun:
    """An ingress request, decided by the rules or ``pending`` on the semantic stage."""

    request: ChatRequest
    config: LoadedConfig
    decision: Decision | None = None
    pending: Pending | None = None
    rules_s: float = 0.0  # how long the rules took (the semantic stage's time is added to it)


class IngressHandler:
    """A batch of ChatRequests from producers → classified → tier topics, published together.

    Unreadable requests become dead letters (and a ChatError on the results topic when they name a
    request id) inside the same publish, so the batch's offsets are committed only once every
    routed message, dead letter and error is stored. If the publish fails, the consumer retries
    the whole batch; the duplicates that may leave are answered from the workers' outcome cache.
    """

    def __init__(
        self, router: Router, publisher: BatchPublisher, name: str, max_bytes: int | None = None
    ) -> None:
        self.router, self.publisher, self.name = router, publisher, name
        self.max_bytes = max_bytes  # the HTTP body limit holds for the ingress too
        self.routed = 0
        self.dead_letters = 0

    async def __call__(self, records: Sequence[ConsumerRecord]) -> None:
        out: list[Outgoing] = []
        # (tier, status) → requests: counted once the batch is published
        tally: Counter[tuple[str, telemetry.RouterStatus]] = Counter()
        waiting: list[tuple[ConsumerRecord, _Begun]] = []
        for record in records:
            begun = self._begin(record)
            if isinstance(begun, Exception):
                self._count(record, begun, out, tally)
            elif begun.pending is not None:
                waiting.append((record, begun))  # the semantic stage reads it, below
            else:
                telemetry.decided(begun.rules_s)
                self._count(record, self._route(record, begun, out), out, tally)
        if waiting:  # together: the semantic stage encodes their texts in micro-batches
            decisions = await asyncio.gather(*(self._finish(b) for _, b in waiting))
            for (record, begun), decision in zip(waiting, decisions, strict=True):
                begun.decision = decision
                self._count(record, self._route(record, begun, out), out, tally)
        await self.publisher.publish_all(out)
        dead = sum(n for (_, status), n in tally.items() if status != "routed")
        self.dead_letters += dead
        self.routed += len(records) - dead
        telemetry.router_handled(tally)
        if dead:
            telemetry.dead_lettered("router", self.router.topics.ingress, dead)

    def _count(
        self,
        record: ConsumerRecord,
        routed: str | Exception,
        out: list[Outgoing],
        tally: Counter[tuple[str, telemetry.RouterStatus]],
    ) -> None:
        """Tally ``record``, routed to a tier or refused (its refusal appended to ``out``)."""
        if isinstance(routed, Exception):
            out.extend(self._refusal(record, routed))
            tally["", "rejected" if _bad_input(routed) else "error"] += 1
        else:
            tally[routed, "routed"] += 1

    async def _finish(self, begun: _Begun) -> Decision:
        """The semantic stage's part of ``begun``'s decision, timed with the rules' part."""
        assert begun.pending is not None
        started = time.perf_counter()
        decision = await self.router.finish(begun.pending, begun.config)
        telemetry.decided(begun.rules_s + time.perf_counter() - started)
        return decision

    def _begin(self, record: ConsumerRecord) -> _Begun | Exception:
        """``record`` parsed and decided by the rules; ``_Begun`` when the semantic stage is
        next; the exception when it is a dead letter."""
        payload: bytes | None = record.value
        try:
            if self.max_bytes is not None and len(payload or b"") > self.max_bytes:
                raise TooLarge(f"request of {len(payload or b'')} bytes, over {self.max_bytes}")
            request = ChatRequest.model_validate_json(payload or b"")
            if request.stream:
                raise NotStreamed(
                    "'stream': true is served over HTTP (server-sent events); a Kafka job's "
                    "answer is one ChatResult on the results topic: omit 'stream'"
                )
            started = time.perf_counter()
            stage, config = self.router.begin(request)
            rules_s = time.perf_counter() - started
        except Exception as exc:  # pure computation: whatever fails is this record's
            return exc
        if isinstance(stage, Pending):
            return _Begun(request, config, pending=stage, rules_s=rules_s)
        return _Begun(request, config, decision=stage, rules_s=rules_s)

    def _route(self, record: ConsumerRecord, begun: _Begun, out: list[Outgoing]) -> str | Exception:
        """Append what ``begun`` turns into to ``out``: the tier it is routed to; the exception
        when it is a dead letter."""
        payload: bytes | None = record.value
        request = begun.request
        assert begun.decision is not None
        try:
            own_id = "request_id" in request.model_fields_set  # else a fresh one: no resend
            routed = self.router.route(
                request,
                self.router.topics.results,
                caller_waits=False,
                scope=request.metadata.tenant or record.key,
                content_hash=payload_fingerprint(payload or b"") if own_id else None,
                decided=(begun.decision, begun.config),
            )
            out.append(self.router.encode(routed, payload))
            if (kept := self.router.captured(routed)) is not None:
                out.append(kept)
            return routed.tier
        except Exception as exc:  # routing is pure computation: whatever fails is this record's
            return exc

    def _refusal(self, record: ConsumerRecord, exc: Exception) -> list[Outgoing]:
        """The dead letter for ``record``, and the ChatError its producer waits for (when the
        record names a request id)."""
        topics = self.router.topics
        letter = from_record(record, self.name, exc)
        out = [Outgoing(topics.dead_letter, letter.model_dump_json().encode())]
        if request_id := _request_id_of(record.value):
            error = ChatError(
                request_id=request_id,
                code="invalid_request" if _bad_input(exc) else "internal_error",
                message=describe(exc),
            )
            out.append(
                Outgoing(topics.results, error.model_dump_json().encode(), request_id.encode())
            )
        return out

    async def poisoned(self, record: ConsumerRecord, exc: Exception) -> None:
        """The consumer's ``on_poison``: a record the batch failed on for no transient reason."""
        await self.publisher.publish_all(self._refusal(record, exc))
        self.dead_letters += 1
        telemetry.router_handled({("", "rejected" if _bad_input(exc) else "error"): 1})
        telemetry.dead_lettered("router", record.topic)


def _bad_input(exc: Exception) -> bool:
    """Is ``exc`` the request's own fault (``invalid_request``), not the router's?"""
    return isinstance(
        exc, ValidationError | UnknownModel | BadImage | MissingCapability | TooLarge | NotStreamed
    )


class ReplyHandler:
    """Outcomes on this router's reply topic → the HTTP callers waiting for them.

    An unreadable reply goes to the dead-letter topic with its reason; the caller it was meant
    for (if any) gets its 504 when the deadline passes.
    """

    def __init__(self, replies: PendingReplies, publisher: Publisher, dead_letter: str, name: str):
        self.replies = replies
        self.publisher, self.dead_letter, self.name = publisher, dead_letter, name
        self.dead_letters = 0

    async def __call__(self, record: ConsumerRecord) -> None:
        try:
            reply = _REPLY.validate_json(record.value or b"")
        except ValueError as exc:  # ValidationError, and anything else the bytes cause
            log.error("unreadable reply dead-lettered: %s", describe(exc))
            await self.publisher.publish(self.dead_letter, from_record(record, self.name, exc))
            self.dead_letters += 1
            telemetry.dead_lettered("router", record.topic)
            return
        if isinstance(reply, StreamChunk):
            self.replies.chunk(reply)
        else:
            self.replies.resolve(reply)
