"""The router's broker watch: callers waiting for answers get a 503 at once when Kafka goes away
or comes back without the router's reply topic. A broker of its own (the test kills it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.kafka import ensure_topics
from services.router.errors import ApiError
from services.router.service import PendingReplies
from services.router.watch import BrokerWatch
from switchboard.embedded import Child, free_port, start_broker
from tests.integration.stack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def own_broker(logs_dir: Path) -> Iterator[tuple[Child, str]]:
    port = free_port()
    child = start_broker(port, logs_dir)
    yield child, f"127.0.0.1:{port}"
    child.stop()


async def failure(future: asyncio.Future[object]) -> ApiError:
    async with asyncio.timeout(30):
        with pytest.raises(ApiError) as caught:
            await asyncio.shield(future)
    return caught.value


async def test_waiting_callers_get_a_503_when_the_broker_dies(
    own_broker: tuple[Child, str], topic_prefix: str
) -> None:
    broker, bootstrap = own_broker
    reply_topic = f"{topic_prefix}.replies.r1"
    await ensure_topics(bootstrap, [reply_topic], 1)
    replies = PendingReplies()
    watch = BrokerWatch(bootstrap, reply_topic, replies)
    await watch.start()
    try:
        future, _ = replies.expect("req-1")
        assert not future.done()
        broker.proc.kill()  # no shutdown, no goodbye
        error = await failure(future)  # type: ignore[arg-type]
        assert error.status == 503
        assert error.body()["error"]["code"] == "broker_unavailable"
        assert "Idempotency-Key" in error.body()["error"]["message"]
        assert len(replies) == 0 and watch.failed_callers == 1
    finally:
        await watch.stop()


async def test_waiting_callers_get_a_503_when_the_reply_topic_is_gone(
    own_broker: tuple[Child, str], topic_prefix: str
) -> None:
    _, bootstrap = own_broker
    replies = PendingReplies()
    # the reply topic was never created: what a broker restarted without its data looks like
    watch = BrokerWatch(bootstrap, f"{topic_prefix}.replies.gone", replies)
    await watch.start()
    try:
        future, _ = replies.expect("req-2")
        error = await failure(future)  # type: ignore[arg-type]
        assert error.status == 503 and "reply topic" in error.body()["error"]["message"]
    finally:
        await watch.stop()


async def test_nothing_fails_while_the_broker_is_healthy(
    own_broker: tuple[Child, str], topic_prefix: str
) -> None:
    _, bootstrap = own_broker
    reply_topic = f"{topic_prefix}.replies.ok"
    await ensure_topics(bootstrap, [reply_topic], 1)
    replies = PendingReplies()
    watch = BrokerWatch(bootstrap, reply_topic, replies)
    await watch.start()
    try:
        future, _ = replies.expect("req-3")

        async def probed() -> bool:
            return watch.probes >= 3

        await wait_until(probed, 30)
        assert not future.done() and watch.failed_callers == 0
    finally:
        await watch.stop()
