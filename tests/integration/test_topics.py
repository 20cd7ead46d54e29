"""Topics managed in one place, on the embedded broker: `switchboard topics` creates every topic
and names the ones with too few partitions; reply topics outlive a router's restart and are
swept once no router reads them."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common.kafka import ensure_topics
from services.common.settings import CommonSettings
from services.router.replies import ReplyReader, ReplySweeper, ReplyTopics
from switchboard.topics_cmd import plan, run
from tests.integration.stack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]


async def topic_partitions(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = await admin.list_topics()
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names)}
    finally:
        await admin.close()


async def test_switchboard_topics_creates_every_topic_and_names_the_short_ones(
    kafka_bootstrap: str, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = CommonSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        partitions=3,
        config=ROOT / "config" / "simulated.yaml",
    )
    short = settings.topics.tier("fast")
    await ensure_topics(kafka_bootstrap, [short], 1)  # made by hand, or by an older version

    assert await asyncio.wait_for(run(settings, check=True), 60) == 1  # missing topics
    assert await asyncio.wait_for(run(settings, check=False), 60) == 0
    have = await topic_partitions(kafka_bootstrap)
    for p in plan(settings, ["fast", "balanced", "reasoning", "vision"]):
        assert p.name in have, p.name
        if p.name != short:
            assert have[p.name] == p.partitions, p.name
    assert have[short] == 1  # never changed behind the operator's back: named instead
    capsys.readouterr()
    assert await asyncio.wait_for(run(settings, check=True), 60) == 1  # still too few
    out, err = capsys.readouterr()
    assert f"topic {short} has 1 partitions, fewer than the 3 configured" in err
    assert "only 1 of 3 partitions" in out


async def test_a_service_start_warns_of_a_topic_with_too_few_partitions(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"{topic_prefix}.tier.fast.v1"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    with caplog.at_level(logging.WARNING, logger="services.common.kafka"):
        states = await asyncio.wait_for(ensure_topics(kafka_bootstrap, [topic], 4), 30)
    assert [(s.name, s.partitions, s.too_few) for s in states] == [(topic, 1, True)]
    assert any(
        topic in r.getMessage() and "fewer than the 4" in r.getMessage() for r in caplog.records
    )


async def test_a_restarted_router_reads_its_reply_topic_from_where_it_starts(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}.replies.host-8080"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    got: list[bytes] = []

    async def handler(record: ConsumerRecord) -> None:
        got.append(record.value)

    reader = ReplyReader(kafka_bootstrap, ReplyTopics(topic), handler, 5, "restart-test")
    try:
        await producer.send_and_wait(topic, b"for a caller of the previous run")
        await asyncio.wait_for(reader.start(), 30)
        assert reader.keeps_topic
        await producer.send_and_wait(topic, b"for a caller of this run")
        await wait_until(lambda: asyncio.sleep(0.05, got), 30, "the new answer read")
        assert got == [b"for a caller of this run"]
    finally:
        await reader.stop()
        await producer.stop()


async def test_reply_topics_no_router_reads_are_swept_after_the_grace(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = CommonSettings(topic_prefix=topic_prefix)
    topics = settings.topics
    live, gone, own = (topics.replies(i) for i in ("live-8080", "gone-8080", "self-8080"))
    gone_slot = topics.replies("old-9090") + ".s1"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(n, 1, 1) for n in (live, gone, own, gone_slot)])
    await admin.close()
    # a running router: a member of the router group, with its ingress client id
    member = AIOKafkaConsumer(
        topics.ingress,
        bootstrap_servers=kafka_bootstrap,
        group_id=topics.router_group,
        client_id="router-live-8080-ingress",
    )
    await ensure_topics(kafka_bootstrap, [topics.ingress], 1)
    await member.start()
    try:
        await wait_until(
            lambda: asyncio.sleep(0.05, member.assignment()), 30, "the live router joined its group"
        )
        waiting = ReplySweeper(kafka_bootstrap, topics, lambda: [own], grace_s=3600)
        assert await asyncio.wait_for(waiting.sweep(), 30) == []  # orphaned, within the grace
        sweeper = ReplySweeper(kafka_bootstrap, topics, lambda: [own], grace_s=0)
        assert await asyncio.wait_for(sweeper.sweep(), 30) == sorted([gone, gone_slot])
        left = await topic_partitions(kafka_bootstrap)
        assert live in left and own in left and gone not in left and gone_slot not in left
    finally:
        await member.stop()
