"""An answer for a router that is gone: dropped and counted once its reply topic is known to be
gone, never retried for ever; answers for the Kafka ingress always wait for Kafka."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import REGISTRY
from pydantic import BaseModel

from schemas.v1 import ChatRequest
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class NoAutoCreate:
    """The worker's publisher as on a Kafka broker with auto.create.topics.enable=false: a send
    to a topic that does not exist times out waiting for its metadata."""

    def __init__(self, inner: Any, missing: set[str]) -> None:
        self.inner, self.missing = inner, missing

    async def publish(
        self,
        topic: str,
        message: BaseModel,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if topic in self.missing:
            raise KafkaTimeoutError(f"no metadata for {topic}")
        await self.inner.publish(topic, message, key, headers)


def record(stack: Stack, reply_to: str) -> ConsumerRecord:
    job = ChatRequest(
        request_id=f"orphan-{uuid.uuid4().hex}",
        model="fast",
        messages=[{"role": "user", "content": "anyone there?"}],
    )
    value = stack.router_app.state.ctx.router.route(job, reply_to).model_dump_json().encode()
    return ConsumerRecord(stack.topics.tier("fast"), 0, 1, 0, 0, None, value, None, 0, 1, ())


async def test_an_answer_for_a_router_that_is_gone_is_dropped_and_counted(
    fast_stack: Stack,
) -> None:
    service = fast_stack.workers["fast"].service
    gone = fast_stack.topics.replies(f"gone-{uuid.uuid4().hex[:8]}")
    service.publisher = NoAutoCreate(service.publisher, {gone})
    series = ("switchboard_answers_dropped_total", {"tier": "fast"})
    before = REGISTRY.get_sample_value(*series) or 0.0
    await fast_stack.workers["fast"].handler(record(fast_stack, gone))
    assert service.orphaned == 1
    assert REGISTRY.get_sample_value(*series) == before + 1


async def test_an_answer_for_the_ingress_waits_for_kafka(fast_stack: Stack) -> None:
    service = fast_stack.workers["fast"].service
    results = fast_stack.topics.results
    service.publisher = NoAutoCreate(service.publisher, {results})
    with pytest.raises(KafkaTimeoutError):  # transient: the consumer retries it
        await fast_stack.workers["fast"].handler(record(fast_stack, results))
    assert service.orphaned == 0
