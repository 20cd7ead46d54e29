"""Exactly one active controller: the member of the controller group that holds partition 0 of
the (empty) leader topic. Kafka's group protocol gives each partition to one member; a member
that stops heartbeating loses it to another after the session timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from services.common.consumer import close_consumer
from services.common.kafka import ensure_topics
from services.common.topic_layout import TopicLayout

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Leadership) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.owner.leading = False
        if revoked:
            log.info("controller: no longer the active instance")

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner.leading = any(tp.partition == 0 for tp in assigned)
        self.owner.joined.set()
        log.info("controller: %s", "active" if self.owner.leading else "standby")


class Leadership:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        client_id: str,
        session_timeout_ms: int,
        layout: TopicLayout | None = None,
    ) -> None:
        self._bootstrap, self._topic = bootstrap, topic
        self._layout = layout
        self.leading = False
        self.joined = asyncio.Event()  # the first assignment came (leading or not)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            client_id=client_id,
            enable_auto_commit=False,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(250, session_timeout_ms // 6),
            fetch_max_wait_ms=1000,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await ensure_topics(self._bootstrap, [self._topic], 1, layout=self._layout)
        await self._consumer.start()
        self._consumer.subscribe([self._topic], listener=_Listener(self))
        self._task = asyncio.create_task(self._poll(), name="leadership")

    async def _poll(self) -> None:
        """Polling keeps the membership alive (nothing is ever written to the topic)."""
        while True:
            try:
                await self._consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("controller group: poll failed; trying again", exc_info=True)
                self.leading = False
                await asyncio.sleep(1)

    async def stop(self) -> None:
        self.leading = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await close_consumer(self._consumer)
