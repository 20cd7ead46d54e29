"""Reply topic generations on the real broker: answers arrive across rotations, generations take
turns on a fixed set of topics, and a slot is emptied before it is taken again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.common.tansu import log_ends
from services.router.replies import SLOT_PARTITIONS, SLOTS, ReplyTopics
from tests.integration.stack import API_KEY, produce, running_stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
AUTH = {"authorization": f"Bearer {API_KEY}"}
SIZE = 4


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def _ends(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """Records in each topic, over its partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(SLOT_PARTITIONS)]
        ends = await log_ends(consumer, tps)
    finally:
        await consumer.stop()
    out: dict[str, int] = {}
    for tp, end in ends.items():
        out[tp.topic] = out.get(tp.topic, 0) + end
    return out


def _chat(i: int) -> dict[str, object]:
    return {"model": "fast", "messages": [{"role": "user", "content": f"question {i}"}]}


async def test_answers_arrive_across_generations_on_a_fixed_set_of_topics(
    kafka_bootstrap: str,
    redis_url: str,
    topic_prefix: str,
    routing_config: Path,
    chdb_data_dir: Path,
) -> None:
    async with running_stack(
        kafka_bootstrap,
        redis_url,
        topic_prefix,
        routing_config,
        chdb_data_dir,
        ["fast"],
        router={"reply_generation_size": SIZE},
    ) as stack:
        generations: ReplyTopics = stack.router_app.state.ctx.reply_topics
        async with httpx.AsyncClient(base_url=stack.base_url, headers=AUTH, timeout=60) as http:
            for generation in range(SLOTS + 2):  # one at a time: each generation fills, then turns
                if generation == 1:  # a late answer on a slot before it is emptied for reuse
                    await produce(kafka_bootstrap, generations.topic(0), b'{"late": true}')
                for i in range(SIZE):
                    resp = await http.post("/v1/chat/completions", json=_chat(i))
                    assert resp.status_code == 200, resp.text

                async def rotated(to: int = generation + 1) -> bool:
                    return generations.generation == to

                await wait_until(rotated, 10, f"generation {generation + 1}")
            answers = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=_chat(100 + i)) for i in range(30))
            )
        assert [r.status_code for r in answers] == [200] * 30, [r.text for r in answers]
        assert generations.rotations >= SLOTS + 2
        mine = {t for t in await _topics(kafka_bootstrap) if t.startswith(generations.base)}
        assert mine == set(generations.slots())
        # each slot holds at most what its last generation got, nothing from the ones before
        ends = await _ends(kafka_bootstrap, generations.slots())
        assert all(end <= SIZE + 30 for end in ends.values()), ends
        assert stack.router_app.state.reply_reader.answers >= (SLOTS + 2) * SIZE + 30
