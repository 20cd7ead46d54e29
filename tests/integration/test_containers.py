"""Smoke checks against the servers docker-compose.yml runs: real Kafka, Redis and ClickHouse.

The rest of the suite runs on the embedded stack (Tansu, Valkey, chDB). These tests start the real
servers with testcontainers and drive them through the project's own adapters where there is one
(`ensure_topics`, `ClickHouseStore`). They need a Docker engine and are skipped where none answers.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime

import docker
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from testcontainers.community.clickhouse import ClickHouseContainer
from testcontainers.community.kafka import KafkaContainer
from testcontainers.community.redis import RedisContainer

from schemas.v1 import AttemptEvent
from services.common.kafka import ensure_topics
from services.metrics.adapters.store import ClickHouseStore

# Same major versions as docker-compose.yml where testcontainers allows it. KafkaContainer drives
# the Confluent image's start scripts, so it runs cp-kafka (Apache Kafka 3.x) in KRaft mode rather
# than apache/kafka 4.x; the client protocol used here is the same.
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
REDIS_IMAGE = "redis:7-alpine"
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:25.8"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(600),  # first runs pull the images
    # Deprecations raised inside testcontainers / docker-py are theirs, not ours.
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:testcontainers(\..*)?"),
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:docker(\..*)?"),
]


def docker_engine_answers() -> bool:
    """True when a Docker engine answers a ping; never raises."""
    # docker-py leaks the socket of a failed connection; its ResourceWarning is not ours to fail on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


@pytest.fixture(scope="module")
def docker_engine() -> None:
    if not docker_engine_answers():
        pytest.skip("no Docker engine answers (testcontainers needs one)")


@pytest.fixture(scope="module")
def kafka_server(docker_engine: None) -> Iterator[str]:
    with KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


@pytest.fixture(scope="module")
def redis_server(docker_engine: None) -> Iterator[str]:
    with RedisContainer(REDIS_IMAGE) as server:
        host, port = server.get_container_host_ip(), server.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"


@pytest.fixture(scope="module")
def clickhouse_url(docker_engine: None) -> Iterator[str]:
    with ClickHouseContainer(CLICKHOUSE_IMAGE, username="switchboard", password="test") as server:
        host, port = server.get_container_host_ip(), server.get_exposed_port(8123)
        # The form SWITCHBOARD_CLICKHOUSE_URL takes in docker-compose.yml.
        yield f"http://switchboard:test@{host}:{port}"


async def test_kafka_creates_a_topic_and_round_trips_a_message(kafka_server: str) -> None:
    topic = f"tc-{uuid.uuid4().hex[:10]}.events.v1"
    await ensure_topics(kafka_server, [topic], partitions=3, timeout_s=60)
    payload = uuid.uuid4().bytes

    producer = AIOKafkaProducer(bootstrap_servers=kafka_server)
    await producer.start()
    try:
        partitions = await producer.partitions_for(topic)
        sent = await producer.send_and_wait(topic, payload, key=b"k")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_server,
        group_id=f"tc-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        received = await asyncio.wait_for(consumer.getone(), timeout=60)
    finally:
        await consumer.stop()
    assert partitions == {0, 1, 2}, "ensure_topics did not create the partitions asked for"
    assert (received.value, received.partition, received.offset) == (
        payload,
        sent.partition,
        sent.offset,
    )


async def test_redis_sets_and_gets(redis_server: str) -> None:
    client = aioredis.Redis.from_url(redis_server)
    try:
        key = f"tc:{uuid.uuid4().hex}"
        assert await client.set(key, b"value", ex=60, nx=True)
        assert await client.get(key) == b"value"
        assert not await client.set(key, b"other", ex=60, nx=True), "NX must not overwrite"
    finally:
        await client.aclose()


async def test_clickhouse_store_migrates_inserts_and_reads_back(clickhouse_url: str) -> None:
    store = ClickHouseStore(clickhouse_url, "switchboard_tc")
    try:
        await store.migrate()
        await store.migrate()  # idempotent, as every metrics start runs it
        event = AttemptEvent(
            ts=datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
            request_id=uuid.uuid4().hex,
            tier="fast",
            model="gpt-4o-mini",
            provider="openai",
            rule="short",
            config_hash="0123456789abcdef",
            attempt=0,
            status="ok",
            tokens_in=12,
            tokens_out=34,
            latency_ms=56.5,
            ttft_ms=None,
            cost_usd=0.0001,
        )
        await store.insert([event])
        await store.insert([event])  # a redelivered batch is stored once (dedup token)
        columns, rows = await store.query(
            "SELECT event_id, tier, model, status, tokens_in, tokens_out, ttft_ms, "
            f"toUnixTimestamp64Milli(ts) FROM {store.table} WHERE event_id = '{event.event_id}'"
        )
    finally:
        await store.close()
    assert columns[:4] == ["event_id", "tier", "model", "status"]
    expected_ms = int(event.ts.timestamp() * 1000)
    assert rows == [[event.event_id, "fast", "gpt-4o-mini", "ok", 12, 34, None, expected_ms]]
