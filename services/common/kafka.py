"""Kafka plumbing shared by the services: topic creation and the publisher they all use.

Topics are created explicitly with ``partitions`` partitions: a subscriber-created topic gets one
partition on some brokers, which leaves all but one member of a consumer group idle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from faststream.kafka import KafkaBroker
from pydantic import BaseModel

log = logging.getLogger(__name__)

JSON_HEADERS = {"content-type": "application/json"}
# Largest message a producer sends; oversized requests are refused at the door instead.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


async def ensure_topics(
    bootstrap: str, names: Iterable[str], partitions: int, timeout_s: float = 30.0
) -> None:
    """Create the topics that do not exist yet; waits for the broker up to ``timeout_s``."""
    wanted = sorted(set(names))
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [n for n in wanted if n not in existing]
            if missing:
                try:
                    await admin.create_topics(
                        [
                            NewTopic(n, num_partitions=partitions, replication_factor=1)
                            for n in missing
                        ]
                    )
                except TopicAlreadyExistsError:
                    pass  # another service created it first
            return
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
        finally:
            await admin.close()


async def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        await admin.delete_topics(list(names))
    finally:
        await admin.close()


class Publisher(Protocol):
    """What handlers need from Kafka: send one message and know it was stored."""

    async def publish(self, topic: str, message: BaseModel, key: str | None = None) -> None: ...


class BrokerPublisher:
    """``Publisher`` over a FastStream ``KafkaBroker``: waits for the broker's acknowledgement."""

    def __init__(self, broker: KafkaBroker) -> None:
        self._broker = broker

    async def publish(self, topic: str, message: BaseModel, key: str | None = None) -> None:
        await self._broker.publish(
            message.model_dump_json().encode(),
            topic=topic,
            key=key.encode() if key else None,
            headers=JSON_HEADERS,
        )


def make_broker(bootstrap: str, client_id: str) -> KafkaBroker:
    return KafkaBroker(
        bootstrap,
        client_id=client_id,
        acks="all",
        # No idempotent producer: Tansu answers InitProducerId with an error. Duplicates from
        # producer retries are absorbed downstream (outcome cache, insert de-duplication).
        linger_ms=1,
        max_request_size=MAX_MESSAGE_BYTES,
        logger=logging.getLogger(f"switchboard.kafka.{client_id}"),
    )
