"""Kafka record → routed request → tier service; unreadable records become dead letters."""

from __future__ import annotations

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from schemas.topics import Topics
from schemas.v1 import RoutedRequest
from services.common.deadletter import from_record
from services.common.kafka import Publisher
from services.workers.service import TierService


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

    async def __call__(self, record: ConsumerRecord) -> None:
        try:
            routed = parse(record.value, self.service.tier, self.topics)
        except (ValidationError, Misrouted) as exc:
            letter = from_record(record, self.name, exc)
            await self.publisher.publish(self.topics.dead_letter, letter)
            self.dead_letters += 1
            return
        await self.service.process(routed, f"{record.topic}:{record.partition}:{record.offset}")
