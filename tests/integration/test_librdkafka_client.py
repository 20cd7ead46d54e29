"""A librdkafka client (confluent-kafka, librdkafka 2.2 and later) on the embedded broker: a
request produced to the ingress is answered on the results topic, read by a consumer group
(docs/embedded-broker.md "Clients other than aiokafka")."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from confluent_kafka import Consumer, Producer

from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _produce(bootstrap: str, topic: str, key: str, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    delivered: list[object] = []
    producer.produce(topic, value, key=key, on_delivery=lambda err, msg: delivered.append(err))
    assert producer.flush(30) == 0, "not delivered within 30 s"
    assert delivered == [None], delivered


def _answer(bootstrap: str, topic: str, request_id: str) -> dict[str, object]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"librdkafka-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            # Tansu answers a JoinGroup after about half the session timeout (librdkafka: 45 s)
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    try:
        for _ in range(600):  # 0.1 s polls: 60 s at most
            message = consumer.poll(0.1)
            if message is None or message.error():
                continue
            answer = json.loads(message.value())
            if answer.get("request_id") == request_id:
                consumer.commit(message, asynchronous=False)
                return answer
        raise TimeoutError(f"no answer to {request_id} on {topic} within 60 s")
    finally:
        consumer.close()


async def test_confluent_kafka_puts_a_request_on_the_ingress_and_reads_its_answer(
    fast_stack: Stack,
) -> None:
    request_id = f"rdkafka-{uuid.uuid4().hex}"
    request = {
        "request_id": request_id,
        "model": "fast",
        "metadata": {"tenant": "librdkafka"},
        "messages": [{"role": "user", "content": "Say hello"}],
    }
    topics = fast_stack.topics
    await asyncio.to_thread(
        _produce, fast_stack.bootstrap, topics.ingress, request_id, json.dumps(request).encode()
    )
    answer = await asyncio.to_thread(_answer, fast_stack.bootstrap, topics.results, request_id)
    assert answer["kind"] == "result" and answer["tenant"] == "librdkafka"
