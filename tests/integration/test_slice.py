"""The slice on real parts: HTTP and Kafka ingress → tier topics → workers → ClickHouse rows."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.v1 import ChatRequest
from services.common.tansu import log_ends
from tests.integration.stack import API_KEY, collect, produce, running_stack, wait_until
from tests.integration.test_batch_kafka import committed


async def caught_up(bootstrap: str, group: str, topic: str) -> bool:
    """Has ``group`` committed every record of ``topic`` (2 partitions, as the stack makes it)?"""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await log_ends(consumer, [TopicPartition(topic, p) for p in range(2)])
    finally:
        await consumer.stop()
    return await committed(bootstrap, group, topic, 2) == sum(ends.values())


pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
AUTH = {"authorization": f"Bearer {API_KEY}"}


async def test_http_and_ingress_requests_are_routed_answered_and_recorded(
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
        ["fast", "reasoning"],
    ) as stack:
        async with httpx.AsyncClient(base_url=stack.base_url, headers=AUTH, timeout=60) as http:
            short = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "switchboard/auto",
                    "messages": [{"role": "user", "content": "Hi there"}],
                    "metadata": {"tenant": "acme"},
                },
            )
            deep = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "switchboard/auto",
                    "messages": [
                        {"role": "user", "content": "Prove Fermat's little theorem. " * 8}
                    ],
                    "metadata": {"requires_reasoning": "true"},
                },
            )
        assert short.status_code == 200, short.text
        assert deep.status_code == 200, deep.text
        assert short.headers["x-switchboard-tier"] == "fast"
        assert short.headers["x-switchboard-model"] == "sim-light"
        assert deep.headers["x-switchboard-tier"] == "reasoning"
        assert deep.headers["x-switchboard-rule"] == "reasoning"
        body = short.json()
        assert body["id"] == short.headers["x-switchboard-request-id"]
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["total_tokens"] > 0

        job = ChatRequest(
            request_id=f"job-{uuid.uuid4().hex}",
            messages=[{"role": "user", "content": "Classify: my card was charged twice"}],
            metadata={"task": "triage"},
        )
        await produce(kafka_bootstrap, stack.topics.ingress, job.model_dump_json().encode())
        results = await collect(
            kafka_bootstrap,
            stack.topics.results,
            lambda ms: any(m["request_id"] == job.request_id for m in ms),
        )
        answer = next(m for m in results if m["request_id"] == job.request_id)
        assert (
            answer["kind"] == "result" and answer["tier"] == "fast" and answer["rule"] == "triage"
        )

        ids = [
            short.headers["x-switchboard-request-id"],
            deep.headers["x-switchboard-request-id"],
            job.request_id,
        ]
        id_list = ", ".join(f"'{i}'" for i in ids)
        sql = (
            f"SELECT request_id, tier, model, status, tokens_in, tokens_out, cost_usd, ttft_ms, "
            f"tenant_hash, config_hash FROM switchboard.llm_events WHERE request_id IN ({id_list})"
        )

        async def rows() -> list[list[object]]:
            _, found = await stack.metrics.store.query(sql)
            return found if len(found) == 3 else []

        found = await wait_until(rows)
        by_id = {r[0]: r for r in found}
        assert by_id[ids[0]][1:4] == ["fast", "sim-light", "ok"]
        assert by_id[ids[1]][1:4] == ["reasoning", "sim-reasoning", "ok"]
        assert all(r[4] > 0 and r[5] > 0 and r[6] > 0 and r[7] is not None for r in found)
        assert by_id[ids[0]][8] and by_id[ids[0]][8] != "acme"  # hashed, never the tenant itself
        assert {r[9] for r in found} == {stack.router_app.state.ctx.router.config.hash}


async def test_bad_messages_go_to_the_dead_letter_topic_and_consumers_keep_going(
    kafka_bootstrap: str,
    redis_url: str,
    topic_prefix: str,
    routing_config: Path,
    chdb_data_dir: Path,
) -> None:
    async with running_stack(
        kafka_bootstrap, redis_url, topic_prefix, routing_config, chdb_data_dir, ["fast"]
    ) as stack:
        t = stack.topics
        await produce(
            kafka_bootstrap,
            t.ingress,
            b"{not json",
            json.dumps({"request_id": "bad-1", "messages": []}).encode(),
        )
        await produce(kafka_bootstrap, t.tier("fast"), b'{"schema_version": 9}')
        await produce(kafka_bootstrap, t.events, b'{"request_id": 5}')
        good = ChatRequest(
            request_id="good-1",
            model="fast",
            messages=[{"role": "user", "content": "still flowing?"}],
        )
        await produce(kafka_bootstrap, t.ingress, good.model_dump_json().encode())

        letters = await collect(kafka_bootstrap, t.dead_letter, lambda ms: len(ms) >= 4)
        by_topic: dict[str, list[dict[str, object]]] = {}
        for letter in letters:
            by_topic.setdefault(str(letter["source_topic"]), []).append(letter)
        assert len(by_topic[t.ingress]) == 2
        assert any("messages" in str(m["reason"]) for m in by_topic[t.ingress])
        assert any("Invalid JSON" in str(m["reason"]) for m in by_topic[t.ingress])
        assert "schema_version" in str(by_topic[t.tier("fast")][0]["reason"])
        assert by_topic[t.events][0]["consumer"].startswith("metrics-")  # type: ignore[union-attr]

        results = await collect(
            kafka_bootstrap,
            t.results,
            lambda ms: {m["request_id"] for m in ms} >= {"bad-1", "good-1"},
        )
        outcome = {m["request_id"]: m for m in results}
        assert outcome["bad-1"]["kind"] == "error" and outcome["bad-1"]["code"] == "invalid_request"
        assert outcome["good-1"]["kind"] == "result"


async def test_a_redelivered_request_is_answered_from_redis_without_a_second_model_call(
    kafka_bootstrap: str,
    redis_url: str,
    topic_prefix: str,
    routing_config: Path,
    chdb_data_dir: Path,
) -> None:
    async with running_stack(
        kafka_bootstrap, redis_url, topic_prefix, routing_config, chdb_data_dir, ["fast"]
    ) as stack:
        job = ChatRequest(
            request_id=f"dup-{uuid.uuid4().hex}",
            model="fast",
            messages=[{"role": "user", "content": "once only"}],
        )
        routed = stack.router_app.state.ctx.router.route(job, stack.topics.results)
        payload = routed.model_dump_json().encode()
        await produce(kafka_bootstrap, stack.topics.tier("fast"), payload)
        await collect(
            kafka_bootstrap,
            stack.topics.results,
            lambda ms: any(m["request_id"] == job.request_id for m in ms),
        )
        await produce(kafka_bootstrap, stack.topics.tier("fast"), payload)  # a redelivery
        answers = await collect(
            kafka_bootstrap,
            stack.topics.results,
            lambda ms: sum(m["request_id"] == job.request_id for m in ms) == 2,
        )
        mine = [m for m in answers if m["request_id"] == job.request_id]
        assert mine[0] == mine[1]  # the same answer, byte for byte
        assert stack.workers["fast"].service.replayed == 1

        async def recorded() -> int:
            _, rows = await stack.metrics.store.query(
                f"SELECT count() FROM switchboard.llm_events WHERE request_id = '{job.request_id}'"
            )
            return int(rows[0][0])

        # the event of a model call is published before its answer, so by now both calls' events
        # (if there were two) are on the events topic; once the writer has caught up with it,
        # exactly one row
        await wait_until(recorded, 60, "the model call's event to be stored")
        await wait_until(
            lambda: caught_up(kafka_bootstrap, stack.topics.metrics_group, stack.topics.events),
            60,
            "the metrics writer to catch up",
        )
        assert await recorded() == 1
