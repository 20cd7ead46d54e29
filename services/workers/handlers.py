"""Kafka record → routed request → tier service; unreadable records become dead letters."""

from __future__ import annotations

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from schemas.topics import Topics
from schemas.v1 import ChatError, RoutedRequest
from services.common import telemetry
from services.common.deadletter import describe, from_record
from services.common.kafka import Publisher
from services.workers.service import KeyReused, TierService


class Misrouted(ValueError):
    """A well-formed message this worker must not act on."""


def parse(payload: bytes | None, tier: str, topics: Topics) -> RoutedRequest:
    if payload is None:
        raise Misrouted("empty message")
    routed = RoutedRequest.model_validate_json(payload)
    if routed.tier != tier:
        raise Misrouted(f"tier: message for tier {routed.tier!r} on the topic of tier {tier!r}")
    if not topics.is_reply_topic(routed.reply_to):
        raise Misrouted(f"reply_to: {routed.reply_to!r} is not a Switchboard reply topic")
    return routed


class RecordHandler:
    def __init__(
        self, service: TierService, publisher: Publisher, topics: Topics, name: str
    ) -> None:
        self.service, self.publisher, self.topics, self.name = service, publisher, topics, name
        self.dead_letters = 0
        self.metrics = telemetry.TierMetrics(service.tier)

    async def __call__(self, record: ConsumerRecord) -> None:
        try:
            routed = parse(record.value, self.service.tier, self.topics)
        except (ValidationError, Misrouted) as exc:
            letter = from_record(record, self.name, exc)
            await self.publisher.publish(self.topics.dead_letter, letter)
            self.dead_letters += 1
            telemetry.dead_lettered("worker", record.topic)
            self.metrics.finished("rejected")
            return
        delivery = f"{record.topic}:{record.partition}:{record.offset}"
        self.metrics.finished(await self.service.process(routed, delivery))

    async def poisoned(self, record: ConsumerRecord, exc: Exception) -> None:
        """The consumer's ``on_poison``: handling ``record`` failed for no transient reason.
        Dead-letter it and answer its caller, so neither the partition nor the caller waits."""
        await self.publisher.publish(self.topics.dead_letter, from_record(record, self.name, exc))
        self.dead_letters += 1
        telemetry.dead_lettered("worker", record.topic)
        self.metrics.finished("rejected" if isinstance(exc, KeyReused) else "error")
        try:
            routed = parse(record.value, self.service.tier, self.topics)
        except (ValidationError, Misrouted):
            return
        error = ChatError(
            request_id=routed.request_id,
            tenant=routed.request.metadata.tenant,
            tier=self.service.tier,
            rule=routed.rule,
            config_hash=routed.config_hash,
            code=exc.code if isinstance(exc, KeyReused) else "internal_error",
            message=describe(exc),
        )
        await self.publisher.publish(routed.reply_to, error, key=routed.request_id)
