"""Kafka handlers of the router: the ingress topic and this instance's reply topic."""

from __future__ import annotations

import json
import logging

from pydantic import TypeAdapter, ValidationError

from schemas.v1 import ChatError, ChatRequest, Outcome
from services.common.deadletter import dead_letter, describe
from services.common.kafka import Publisher
from services.router.domain.classify import UnknownModel
from services.router.service import PendingReplies, Router

log = logging.getLogger(__name__)
_OUTCOME = TypeAdapter(Outcome)


def _request_id_of(payload: bytes | None) -> str | None:
    """The producer's request id, if the message is JSON enough to have one."""
    try:
        value = json.loads(payload or b"").get("request_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 200 else None


class IngressHandler:
    """ChatRequest from a producer → classified → tier topic; answers go to the results topic."""

    def __init__(self, router: Router, publisher: Publisher, name: str) -> None:
        self.router, self.publisher, self.name = router, publisher, name
        self.routed = 0
        self.dead_letters = 0

    async def __call__(
        self, payload: bytes | None, topic: str, partition: int, offset: int
    ) -> None:
        topics = self.router.topics
        try:
            request = ChatRequest.model_validate_json(payload or b"")
            routed = self.router.route(request, topics.results)
        except (ValidationError, UnknownModel) as exc:
            letter = dead_letter(
                payload=payload,
                topic=topic,
                partition=partition,
                offset=offset,
                consumer=self.name,
                exc=exc,
            )
            await self.publisher.publish(topics.dead_letter, letter)
            self.dead_letters += 1
            if request_id := _request_id_of(payload):
                error = ChatError(
                    request_id=request_id, code="invalid_request", message=describe(exc)
                )
                await self.publisher.publish(topics.results, error, key=request_id)
            return
        await self.router.publish(routed)
        self.routed += 1


class ReplyHandler:
    """Outcomes on this router's reply topic → the HTTP callers waiting for them."""

    def __init__(self, replies: PendingReplies) -> None:
        self.replies = replies

    async def __call__(self, payload: bytes | None) -> None:
        try:
            outcome = _OUTCOME.validate_json(payload or b"")
        except ValidationError as exc:
            log.error("unreadable reply dropped: %s", describe(exc))
            return
        self.replies.resolve(outcome)
