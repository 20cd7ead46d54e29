"""The embedded broker's keeper on the real broker and services: topics are compacted under
traffic, offsets never move, and nothing is lost or handled twice."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from schemas.topics import Topics
from schemas.v1 import ChatRequest
from services.common.fences import is_filler
from switchboard import keeper as keeper_module
from switchboard.keeper import Keeper
from tests.integration.stack import API_KEY, Stack, produce, running_stack, wait_until

# serial: beside the quick benchmark on another pytest worker, a request waited past its 30 s
# deadline while the keeper compacted (2 of 4 clean-clone CI runs on two workers)
pytestmark = [pytest.mark.integration, pytest.mark.serial, pytest.mark.timeout(240)]
AUTH = {"authorization": f"Bearer {API_KEY}"}


async def _keep(keeper: Keeper, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await keeper.probe()
        await asyncio.sleep(0.05)  # a probe interval, not a wait for something


async def _results(bootstrap: str, topic: str, group: str, want: set[str]) -> Counter[str]:
    """Answers on ``topic`` read by a committing group until every id in ``want`` was seen."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
        enable_auto_commit=True,
        auto_commit_interval_ms=200,
    )
    await consumer.start()
    seen: Counter[str] = Counter()
    try:
        async with asyncio.timeout(120):
            while not want <= set(seen):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    seen.update(
                        json.loads(r.value)["request_id"] for r in records if not is_filler(r)
                    )
    finally:
        await consumer.stop()
    return seen


async def test_topics_are_compacted_under_traffic_and_nothing_is_lost_or_repeated(
    kafka_bootstrap: str,
    redis_url: str,
    topic_prefix: str,
    routing_config: Path,
    chdb_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(keeper_module, "COMPACT_AFTER", 15)
    run_dir = tmp_path / "run"
    async with running_stack(
        kafka_bootstrap,
        redis_url,
        topic_prefix,
        routing_config,
        chdb_data_dir,
        ["fast"],
        embedded_run_dir=run_dir,
    ) as stack:
        topics = Topics(topic_prefix)
        keeper = Keeper(kafka_bootstrap, topics, run_dir, partitions=2)
        await keeper.start()
        stop = asyncio.Event()
        keeping = asyncio.create_task(_keep(keeper, stop))
        try:
            ids = await _traffic(stack, kafka_bootstrap, topics, keeper)
            http_ids, job_ids = ids
            answers = await _results(
                kafka_bootstrap, topics.results, f"{topic_prefix}-reader", set(job_ids)
            )
            assert set(answers) == set(job_ids) and set(answers.values()) == {1}
            await _rows_once(stack, [*http_ids, *job_ids])
            await _compacted(keeper, topics.events, 1)
            tier = topics.tier("fast")

            async def probed_to_the_end() -> bool:
                # offsets never move: the tier topic still ends after every request routed to it
                return sum(keeper.state[tier].ends.values()) == len(http_ids) + len(job_ids)

            await wait_until(probed_to_the_end, 30, f"{tier} to end after every request")
        finally:
            stop.set()
            await keeping
            await keeper.stop()
        events = topics.events
        assert keeper.state[tier].compactions >= 2, keeper.snapshot()
        assert all(
            b <= 2 * keeper_module.COMPACT_AFTER + 4
            for t in (tier, events)
            for b in keeper.state[t].batches().values()
        ), keeper.snapshot()
        assert stack.workers["fast"].fences is not None
        assert stack.workers["fast"].fences.holds >= 4
        assert json.loads((run_dir / "keeper.json").read_text())["topics"][tier]["compactions"]


async def _traffic(
    stack: Stack, bootstrap: str, topics: Topics, keeper: Keeper
) -> tuple[list[str], list[str]]:
    """HTTP requests in waves with ingress jobs between them; every HTTP answer must be a 200.
    Every third wave waits for the keeper to have compacted the tier topic once more."""
    http_ids: list[str] = []
    job_ids: list[str] = []
    async with httpx.AsyncClient(base_url=stack.base_url, headers=AUTH, timeout=60) as http:
        for wave in range(8):
            replies = await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json={
                            "model": "fast",
                            "messages": [{"role": "user", "content": f"{wave} {i}"}],
                        },
                    )
                    for i in range(12)
                )
            )
            assert [r.status_code for r in replies] == [200] * 12, [r.text for r in replies]
            http_ids += [r.headers["x-switchboard-request-id"] for r in replies]
            jobs = [
                ChatRequest(
                    request_id=f"job-{uuid.uuid4().hex}",
                    model="fast",  # the one tier this stack has a worker for
                    messages=[{"role": "user", "content": f"job {wave} {i}"}],
                )
                for i in range(6)
            ]
            await produce(bootstrap, topics.ingress, *(j.model_dump_json().encode() for j in jobs))
            job_ids += [j.request_id for j in jobs]
            if wave % 3 == 2:
                await _compacted(keeper, topics.tier("fast"), wave // 3 + 1)
    return http_ids, job_ids


async def _compacted(keeper: Keeper, topic: str, times: int) -> None:
    async def done() -> bool:
        state = keeper.state.get(topic)
        return state is not None and state.compactions >= times

    await wait_until(done, 60, f"{topic} compacted {times} times")


async def _rows_once(stack: Stack, ids: list[str]) -> None:
    """Exactly one successful attempt row per request in ClickHouse."""
    id_list = ", ".join(f"'{i}'" for i in ids)
    sql = (
        "SELECT request_id, count() FROM switchboard.llm_events "
        f"WHERE request_id IN ({id_list}) AND status = 'ok' GROUP BY request_id"
    )

    async def rows() -> dict[str, int]:
        _, found = await stack.metrics.store.query(sql)
        counted = {str(r[0]): int(str(r[1])) for r in found}
        return counted if len(counted) == len(ids) else {}

    counted = await wait_until(rows, 90, "a row for every request")
    assert set(counted.values()) == {1}, {k: v for k, v in counted.items() if v != 1}
