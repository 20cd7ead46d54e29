"""The router's watch on Kafka: HTTP callers waiting for answers get a clear error, not a long
wait, when the broker goes away or comes back without its data.

Every second the watch asks the broker for its topics. No answer within 2 s, or this router's reply
topic gone (an embedded broker keeps everything in memory, so a restart loses every topic), and
the callers waiting at that moment get a 503 ``broker_unavailable`` at once: their requests may be
lost, and sending them again with the same ``Idempotency-Key`` gets each answered once (a worker
that did answer stored the outcome in Redis).

Lost topics come back by themselves: the embedded broker creates a topic (with its default of 4
partitions) when a client asks for it, and every client refreshes its metadata every
``METADATA_MAX_AGE_MS``, so consumers find the new partitions. Creating them here as well raced
with that and left the broker failing produce requests to them. The reply consumer, whose position
is past the new reply topic's end, is sent back to its start on the next probe (``rewind_lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from services.common.consumer import rewind_lost
from services.router.errors import ApiError
from services.router.service import PendingReplies

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0


class BrokerWatch:
    def __init__(
        self,
        bootstrap: str,
        reply_topic: str,
        replies: PendingReplies,
        reply_consumer: Callable[[], AIOKafkaConsumer | None] = lambda: None,
    ) -> None:
        self._bootstrap = bootstrap
        self._reply_topic = reply_topic
        self._replies = replies
        self._reply_consumer = reply_consumer  # the reply topic's consumer, once it runs
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.failed_callers = 0
        self.probes = 0

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, request_timeout_ms=int(PROBE_TIMEOUT_S * 1000)
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._loop(), name="broker-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)  # a probe interval, not a wait for something
            try:
                problem = await self._probe()
                self.probes += 1
            except Exception:
                log.exception("broker watch: probe failed")
                continue
            if problem is not None:
                self._fail_waiting(problem)
            elif (consumer := self._reply_consumer()) is not None:
                try:
                    await rewind_lost(consumer)
                except Exception:
                    log.exception("broker watch: could not check the reply consumer's position")

    async def _probe(self) -> str | None:
        assert self._consumer is not None
        try:
            existing = await asyncio.wait_for(self._consumer.topics(), PROBE_TIMEOUT_S)
        except (TimeoutError, KafkaError, OSError):
            return "the router lost its connection to Kafka"
        if self._reply_topic in existing:
            return None
        return "Kafka lost this router's reply topic (restarted without its data?)"

    def _fail_waiting(self, problem: str) -> None:
        waiting = len(self._replies)
        if not waiting:
            return
        self.failed_callers += waiting
        log.warning("broker watch: %s; failing %d waiting callers with 503", problem, waiting)
        self._replies.fail_all(
            ApiError(
                503,
                f"{problem}; the request may not be answered. Send it again with the same "
                "Idempotency-Key: it is answered once either way.",
                type="service_unavailable",
                code="broker_unavailable",
            )
        )
