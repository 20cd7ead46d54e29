"""Cancels of streamed requests whose client left: read from the cancel topic by every worker.

A router whose streaming client disconnects (and was the last caller waiting on the request)
publishes a ``CancelRequest``. Each worker reads the topic without a group, from where it was
when the worker started, and keeps the last ``KEEP`` ids it saw: a streamed call in flight for
one of them is stopped (its row says ``cancelled``), and one that has not begun is not begun.
Best effort by design: a cancel the worker misses (it was restarting) costs one model call that
nobody reads, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from schemas.v1 import CancelRequest
from services.common.consumer import close_consumer, follow
from services.common.kafka import partitions_of

log = logging.getLogger(__name__)

KEEP = 10_000  # recent cancels remembered, for requests still queued when their client left
_FETCH_WAIT_MS = 100  # how long a fetch waits for a cancel: the worst case of noticing one


class Cancels:
    def __init__(self, bootstrap: str, topic: str, client_id: str) -> None:
        self._bootstrap, self._topic, self._client_id = bootstrap, topic, client_id
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._watching: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            enable_auto_commit=False,
            fetch_max_wait_ms=_FETCH_WAIT_MS,
        )
        await consumer.start()
        try:
            partitions = [
                TopicPartition(self._topic, p) for p in await partitions_of(consumer, self._topic)
            ]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
        except BaseException:
            await close_consumer(consumer)
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(follow(consumer, self._record, "cancels"), name="cancels")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await close_consumer(self._consumer)
            self._consumer = None

    def _record(self, record: ConsumerRecord) -> None:
        try:
            cancel = CancelRequest.model_validate_json(record.value or b"")
        except ValidationError:
            return  # not ours to dead-letter: every worker reads this topic
        self.cancel(cancel.request_id)

    def cancel(self, request_id: str) -> None:
        self._recent[request_id] = None
        self._recent.move_to_end(request_id)
        while len(self._recent) > KEEP:
            self._recent.popitem(last=False)
        watcher = self._watching.get(request_id)
        if watcher is not None:
            watcher.set()

    def cancelled(self, request_id: str) -> bool:
        return request_id in self._recent

    @contextlib.contextmanager
    def watch(self, request_id: str):  # type: ignore[no-untyped-def]
        """An event set when ``request_id`` is cancelled (at once, if it was already)."""
        event = asyncio.Event()
        if request_id in self._recent:
            event.set()
        self._watching[request_id] = event
        try:
            yield event
        finally:
            if self._watching.get(request_id) is event:
                del self._watching[request_id]
