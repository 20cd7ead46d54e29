"""Reply topic generations on the real broker: answers arrive across rotations, old generations
are deleted once nobody waits on them, and one a late answer brings back is deleted again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services.router import replies
from services.router.replies import ReplyTopics
from tests.integration.stack import API_KEY, produce, running_stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
AUTH = {"authorization": f"Bearer {API_KEY}"}


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def _chat(i: int) -> dict[str, object]:
    return {"model": "fast", "messages": [{"role": "user", "content": f"question {i}"}]}


async def test_answers_arrive_across_generations_and_old_ones_are_deleted(
    kafka_bootstrap: str,
    redis_url: str,
    topic_prefix: str,
    routing_config: Path,
    chdb_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replies, "STRAYS_EVERY", 5)  # look for strays every 0.5 s
    async with running_stack(
        kafka_bootstrap,
        redis_url,
        topic_prefix,
        routing_config,
        chdb_data_dir,
        ["fast"],
        router={"reply_generation_size": 4},
    ) as stack:
        generations: ReplyTopics = stack.router_app.state.ctx.reply_topics
        async with httpx.AsyncClient(base_url=stack.base_url, headers=AUTH, timeout=60) as http:
            for generation in range(3):  # one at a time: each generation fills, then rotates
                for i in range(4):
                    resp = await http.post("/v1/chat/completions", json=_chat(i))
                    assert resp.status_code == 200, resp.text

                async def rotated(to: int = generation + 1) -> bool:
                    return generations.generation == to

                await wait_until(rotated, 10, f"generation {generation + 1}")
            answers = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=_chat(100 + i)) for i in range(30))
            )
        assert [r.status_code for r in answers] == [200] * 30, [r.text for r in answers]
        assert generations.rotations >= 3
        base = generations.base

        async def only_live_left() -> bool:
            mine = {t for t in await _topics(kafka_bootstrap) if t.startswith(f"{base}.g")}
            return mine == set(generations.live()) and len(mine) == 1

        await wait_until(only_live_left, 30, "the old generations to be deleted")
        assert generations.retired == generations.rotations

        gone = generations.topic(0)
        await produce(kafka_bootstrap, gone, b'{"late": true}')  # a late answer recreates it

        async def deleted_again() -> bool:
            return gone not in await _topics(kafka_bootstrap)

        await wait_until(deleted_again, 30, f"{gone} to be deleted again")
