"""Checks against the servers docker-compose.yml runs: real Kafka, Redis and ClickHouse.

The rest of the suite runs on the embedded stack (Tansu, Valkey, chDB). These tests start the
images docker-compose.yml names (read from it, not repeated here) with testcontainers, Kafka with
the broker settings of compose's `kafka-1` (size limits, no topic auto-creation) on one node, Redis
with a password, and drive them through the project's own code: `ensure_topics`, the services in
this process (tests/integration/stack.py), `ClickHouseStore`. They need a Docker engine and are
skipped where none answers.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import random
import re
import struct
import uuid
import warnings
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import docker
import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from testcontainers.community.clickhouse import ClickHouseContainer
from testcontainers.community.redis import RedisContainer
from testcontainers.core.container import DockerContainer
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

from schemas.v1 import AttemptEvent, ChatRequest
from services.common.kafka import ensure_topics, topic_exists
from services.common.settings import CommonSettings
from services.metrics.adapters.store import ClickHouseStore
from services.metrics.config import MetricsSettings
from services.router.config import RouterSettings
from switchboard.topics_cmd import describe
from tests.integration.stack import API_KEY, running_stack, wait_until, within
from tests.unit.test_compose import kafka_nodes, load_compose, resolved_env

COMPOSE = load_compose()
KAFKA_IMAGE = next(iter(kafka_nodes(COMPOSE).values()))["image"]
REDIS_IMAGE = COMPOSE["services"]["redis"]["image"]
CLICKHOUSE_IMAGE = COMPOSE["services"]["clickhouse"]["image"]
REDIS_PASSWORD = f"tc-{uuid.uuid4().hex}"
# How long a worker may take to drop an answer for a router whose reply topic is gone: its
# producer waits for the missing topic's metadata (aiokafka's request_timeout_ms, 40 s), then it
# asks the broker whether the topic exists.
ORPHAN_BOUND_S = 90.0

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


def single_node_broker_env() -> dict[str, str]:
    """compose's `kafka-1` settings, made a cluster of one reachable from this host: its own
    listeners and voters, and one replica of Kafka's internal topics. Everything else (record
    sizes, no topic auto-creation, ...) is what compose runs."""
    node = kafka_nodes(COMPOSE)["kafka-1"]
    env = {k: v for k, v in resolved_env(node).items() if not k.startswith("KAFKA_ADVERTISED")}
    env.update(
        KAFKA_NODE_ID="1",
        KAFKA_PROCESS_ROLES="broker,controller",
        KAFKA_LISTENERS="PLAINTEXT://0.0.0.0:9092,BROKER://0.0.0.0:9093,CONTROLLER://0.0.0.0:9094",
        KAFKA_LISTENER_SECURITY_PROTOCOL_MAP=(
            "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT"
        ),
        KAFKA_INTER_BROKER_LISTENER_NAME="BROKER",
        KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
        KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9094",
        KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
        KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR="1",
        KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR="1",
        KAFKA_DEFAULT_REPLICATION_FACTOR="1",
        KAFKA_MIN_INSYNC_REPLICAS="1",
    )
    return env


class ApacheKafkaContainer(DockerContainer):
    """One apache/kafka KRaft node, advertised on the port Docker maps for it.

    That port is known only once the container exists, so the container first waits for a start
    script; the script exports the advertised listeners and runs the image's own start
    (/etc/kafka/docker/run), as testcontainers' KafkaContainer does for the Confluent image.
    """

    PORT = 9092
    SCRIPT = "/tmp/tc-start.sh"
    WRITTEN = "/tmp/tc-start.written"  # copied after the script: it is whole once this exists

    def __init__(self, image: str, env: dict[str, str]) -> None:
        super().__init__(image)
        self.with_exposed_ports(self.PORT)
        for key, value in env.items():
            self.with_env(key, value)
        wait = f"while [ ! -f {self.WRITTEN} ]; do sleep 0.1; done; exec bash {self.SCRIPT}"
        self.with_command(["sh", "-c", wait])

    def start(self) -> Self:
        super().start()
        host, port = self.get_container_host_ip(), self.get_exposed_port(self.PORT)
        script = (
            "#!/bin/bash\n"
            f"export KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://{host}:{port},BROKER://localhost:9093\n"
            "exec /etc/kafka/docker/run\n"
        )
        self.copy_into_container(script.encode(), self.SCRIPT, 0o755)
        self.copy_into_container(b"", self.WRITTEN)
        started = LogMessageWaitStrategy(re.compile(r"Kafka Server started"))
        started.with_startup_timeout(180)
        started.wait_until_ready(self)
        return self

    def get_bootstrap_server(self) -> str:
        return f"{self.get_container_host_ip()}:{self.get_exposed_port(self.PORT)}"


@pytest.fixture(scope="module")
def docker_engine() -> None:
    if not docker_engine_answers():
        pytest.skip("no Docker engine answers (testcontainers needs one)")


@pytest.fixture(scope="module")
def kafka_server(docker_engine: None) -> Iterator[str]:
    with ApacheKafkaContainer(KAFKA_IMAGE, single_node_broker_env()) as kafka:
        yield kafka.get_bootstrap_server()


@pytest.fixture(scope="module")
def redis_server(docker_engine: None) -> Iterator[str]:
    """A Redis that requires REDIS_PASSWORD; the URL carries none, as in docker-compose.yml."""
    with RedisContainer(REDIS_IMAGE, password=REDIS_PASSWORD) as server:
        host, port = server.get_container_host_ip(), server.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"


@pytest.fixture(scope="module")
def clickhouse_server(docker_engine: None) -> Iterator[str]:
    with ClickHouseContainer(CLICKHOUSE_IMAGE, username="switchboard", password="test") as server:
        host, port = server.get_container_host_ip(), server.get_exposed_port(8123)
        # The form SWITCHBOARD_CLICKHOUSE_URL takes in docker-compose.yml: no credentials.
        yield f"http://{host}:{port}"


@pytest.fixture
def production_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What compose gives every service and the embedded stack's tests do not: idempotent
    producers (Apache Kafka has them) and the Redis password."""
    monkeypatch.setenv("SWITCHBOARD_KAFKA_IDEMPOTENCE", "true")
    monkeypatch.setenv("SWITCHBOARD_REDIS_PASSWORD", REDIS_PASSWORD)


def test_the_images_are_the_ones_compose_runs() -> None:
    """Read from docker-compose.yml: a tag changed there is the tag tested here."""
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", KAFKA_IMAGE), KAFKA_IMAGE
    broker = single_node_broker_env()
    assert broker["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    limit = CommonSettings.model_fields["max_message_bytes"].default
    assert int(broker["KAFKA_MESSAGE_MAX_BYTES"]) >= limit
    assert int(broker["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= limit


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


async def test_redis_requires_the_password_and_sets_and_gets(redis_server: str) -> None:
    anonymous = aioredis.Redis.from_url(redis_server)
    client = aioredis.Redis.from_url(redis_server, password=REDIS_PASSWORD)
    try:
        with pytest.raises(aioredis.AuthenticationError):
            await anonymous.get("anything")
        key = f"tc:{uuid.uuid4().hex}"
        assert await client.set(key, b"value", ex=60, nx=True)
        assert await client.get(key) == b"value"
        assert not await client.set(key, b"other", ex=60, nx=True), "NX must not overwrite"
    finally:
        await anonymous.aclose()
        await client.aclose()


async def test_clickhouse_store_migrates_inserts_and_reads_back(
    clickhouse_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the user and password arrive as their own settings, as compose and Kubernetes pass them
    monkeypatch.setenv("SWITCHBOARD_CLICKHOUSE_USER", "switchboard")
    monkeypatch.setenv("SWITCHBOARD_CLICKHOUSE_PASSWORD", "test")
    settings = MetricsSettings(
        clickhouse_url=clickhouse_server, clickhouse_database="switchboard_tc"
    )
    store = ClickHouseStore(
        settings.store_url, settings.clickhouse_database, credentials=settings.store_credentials
    )
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


# --- the services on real Kafka -------------------------------------------------------------------


def png(width: int, height: int, seed: int = 0) -> bytes:
    """An RGB PNG of random pixels, stored uncompressed: about width * height * 3 bytes."""
    rows = random.Random(seed).randbytes(height * width * 3)
    raw = b"".join(
        b"\x00" + rows[y * width * 3 : (y + 1) * width * 3] for y in range(height)
    )  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 0))
        + chunk(b"IEND", b"")
    )


async def test_a_request_with_a_3_mb_image_is_answered(
    kafka_server: str,
    redis_server: str,
    routing_config: Path,
    chdb_data_dir: Path,
    topic_prefix: str,
    production_settings: None,
) -> None:
    """Several MB travel the tier topic as one record: the topic's max.message.bytes, the
    producers' request size and the consumers' fetch sizes all follow SWITCHBOARD_MAX_MESSAGE_BYTES,
    and the broker (compose's settings) takes and serves such a record."""
    image = png(1000, 1000)
    assert 3_000_000 <= len(image) <= RouterSettings.model_fields["max_image_bytes"].default
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {
        "model": "switchboard/auto",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is in this picture?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }
    async with running_stack(
        kafka_server, redis_server, topic_prefix, routing_config, chdb_data_dir, ["vision"]
    ) as stack:
        headers = {"authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=120) as client:
            resp = await client.post("/v1/chat/completions", json=body, headers=headers)
        tier_topic = stack.topics.tier("vision")
        found = await within(60, "the tier topic's configs", describe(kafka_server, [tier_topic]))
    assert resp.status_code == 200, resp.text[:2000]
    assert resp.headers["x-switchboard-tier"] == "vision"
    assert resp.json()["choices"][0]["message"]["content"]
    limit = CommonSettings.model_fields["max_message_bytes"].default
    assert found[tier_topic].configs.get("max.message.bytes") == str(limit), found


async def test_an_answer_for_a_deleted_reply_topic_is_dropped_and_counted_in_bounded_time(
    kafka_server: str,
    redis_server: str,
    routing_config: Path,
    chdb_data_dir: Path,
    topic_prefix: str,
    production_settings: None,
) -> None:
    """The router that sent the request is gone and its reply topic deleted; with topic
    auto-creation off the answer cannot be sent. The worker finds the topic gone, drops the
    answer, counts it, and commits the request instead of retrying it for ever."""
    async with running_stack(
        kafka_server, redis_server, topic_prefix, routing_config, chdb_data_dir, ["fast"]
    ) as stack:
        worker = stack.workers["fast"]
        gone = stack.topics.replies(f"gone-{uuid.uuid4().hex[:8]}")
        await ensure_topics(kafka_server, [gone], partitions=1, timeout_s=60)
        await delete_topic(kafka_server, gone)
        job = ChatRequest(
            request_id=f"orphan-{uuid.uuid4().hex}",
            model="fast",
            messages=[{"role": "user", "content": "anyone there?"}],
        )
        routed = stack.router_app.state.ctx.router.route(job, gone)
        tier_topic = stack.topics.tier("fast")
        sent = await send(
            kafka_server, tier_topic, routed.model_dump_json().encode(), job.request_id
        )

        async def dropped() -> bool:
            return worker.service.orphaned == 1

        await wait_until(dropped, ORPHAN_BOUND_S, "the answer to be dropped")

        async def committed() -> bool:
            offsets = await group_offsets(kafka_server, worker.consumer_group)
            done = offsets.get(TopicPartition(tier_topic, sent[0]))
            return done is not None and done > sent[1]

        await wait_until(committed, 60, "the request to be committed")
        assert worker.service.orphaned == 1, "dropped once, not retried"


async def delete_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()

    async def deleted() -> bool:
        return not await topic_exists(bootstrap, topic)

    await wait_until(deleted, 60, f"{topic} to be deleted")


async def send(bootstrap: str, topic: str, value: bytes, key: str) -> tuple[int, int]:
    """Store one record; its (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await within(60, "a test producer to start", producer.start())
    try:
        meta = await within(
            60, f"a record on {topic}", producer.send_and_wait(topic, value, key.encode())
        )
    finally:
        await within(60, "a test producer to stop", producer.stop())
    return meta.partition, meta.offset


async def group_offsets(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        found: dict[TopicPartition, Any] = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in found.items()}
