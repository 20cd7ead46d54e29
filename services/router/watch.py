"""The router's watch on Kafka: HTTP callers get a clear error, not a long wait, when the broker
goes away or comes back without its data, and nothing is published until it is usable again.

Every second the watch asks the broker for its topics. No answer within 2 s, or this router's reply
topic gone (an embedded broker keeps everything in memory, so a restart loses every topic), and
the callers waiting at that moment get a 503 ``broker_unavailable`` at once: their requests may be
lost, and sending them again with the same ``Idempotency-Key`` gets each answered once (a worker
that did answer stored the outcome in Redis). Until the broker answers with every topic again
(``ready``), new requests get that 503 without being published: a publish queued for a broker that
is away goes out when it is back, to a topic that may not exist yet, and such writes are what an
embedded broker loses (below).

A restarted embedded broker may have the reply topic again before the watch looks: any client's
metadata request that names it (a worker about to send an answer) creates it, empty. So when the
connection comes back, the watch also looks at the reply topic: one with another partition count
than the router made it with, or with a partition that ends before the reply consumer's position,
was begun anew, and is renewed as if it were lost. On Kafka a reconnect finds every partition
where it was, and nothing happens.

Lost topics are created again by the watch at once, every probe 0.2 s apart while Kafka is not
usable. The broker keeps what producers that still have the old metadata write to a topic before
anything creates it again, and a topic created over those writes starts at offset 0 under them:
it refuses produce requests for a while (the publishers send them again) and may lose records
written meanwhile. Creating the topics early keeps that window short. The reply topic, which only
this router reads, is renewed completely: created, deleted with what it holds, created again (one
partition); the reply consumer is sent back to its start, and only then are the callers waiting
failed, whose answers may have gone with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from services.common.consumer import close_consumer
from services.common.kafka import delete_topics, ensure_topics
from services.common.retry import cancel_and_wait
from services.common.tansu import log_ends, rewind_lost
from services.common.topic_layout import TopicLayout
from services.router.errors import ApiError
from services.router.service import PendingReplies

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
INTERVAL_DOWN_S = 0.2
PROBE_TIMEOUT_S = 2.0
_REPLY_TOPIC_LOST = "Kafka lost this router's reply topic (restarted without its data?)"


class BrokerWatch:
    def __init__(
        self,
        bootstrap: str,
        reply_topic: Callable[[], str],
        replies: PendingReplies,
        reply_consumer: Callable[[], AIOKafkaConsumer | None] = lambda: None,
        topics: Sequence[str] = (),
        partitions: int = 4,
        stall_s: float = 60.0,
        reply_partitions: int = 1,
        compacting: Callable[[str], bool] = lambda topic: False,
        layout: TopicLayout | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._layout = layout
        self._reply_topic = reply_topic  # the current one: it changes on the embedded broker
        self._topics = list(topics)  # the shared topics the router creates at start
        self._partitions = partitions
        self._reply_partitions = reply_partitions
        # a topic the embedded broker's keeper is compacting is missing for a few ms: not lost
        self._compacting = compacting
        self.ready = True  # Kafka answers and has every topic: requests may be published
        self._why = ""
        self._stall_s = stall_s
        self.stalled = ""  # why callers wait with no answer coming, if they do
        self._replies = replies
        self._reply_consumer = reply_consumer  # the reply topic's consumer, once it runs
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.failed_callers = 0
        self.probes = 0
        self.renewed = 0  # times the reply topic was found lost and created again
        # the connection was lost since the reply topic's ends were last compared (see above)
        self._reconnecting = False

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, request_timeout_ms=int(PROBE_TIMEOUT_S * 1000)
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._loop(), name="broker-watch")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._consumer is not None:
            await close_consumer(self._consumer)

    async def _loop(self) -> None:
        while True:
            # a probe interval, not a wait for something; quicker while Kafka is not usable
            await asyncio.sleep(INTERVAL_S if self.ready else INTERVAL_DOWN_S)
            try:
                problem = await self._probe()
                self.probes += 1
            except Exception:
                log.exception("broker watch: probe failed")
                continue
            self._check_stall()
            if problem is not None:
                self._fail_waiting(problem)
            elif (consumer := self._reply_consumer()) is not None:
                try:
                    await rewind_lost(consumer)
                except Exception:
                    log.exception("broker watch: could not check the reply consumer's position")

    async def _probe(self) -> str | None:
        """What is wrong with Kafka, if anything; lost topics are created again on the way."""
        assert self._consumer is not None
        try:
            existing = await asyncio.wait_for(self._consumer.topics(), PROBE_TIMEOUT_S)
        except (TimeoutError, KafkaError, OSError):
            self._reconnecting = True
            self._set_ready(False, "the connection to Kafka is lost")
            return "the router lost its connection to Kafka"
        missing = [t for t in self._topics if t not in existing and not self._compacting(t)]
        if self._reply_topic() not in existing or await self._reply_topic_begun_anew():
            self._set_ready(False, "Kafka lost this router's reply topic")
            if missing:
                await self._create(missing)
            await self._renew_reply_topic()
            return _REPLY_TOPIC_LOST
        if missing:
            self._set_ready(False, f"Kafka lost topics {missing}")
            if not await self._create(missing):
                return f"Kafka lost topics {missing}"
        self._set_ready(True, "Kafka is back with every topic")
        return None

    async def _reply_topic_begun_anew(self) -> bool:
        """After a reconnect: does a reply partition end before the reply consumer's position?
        False once compared (or when there is nothing to compare)."""
        consumer = self._reply_consumer()
        if not self._reconnecting or consumer is None or not (assigned := consumer.assignment()):
            self._reconnecting = False
            return False
        positions = {}
        for tp in assigned:
            try:
                positions[tp] = await asyncio.wait_for(consumer.position(tp), PROBE_TIMEOUT_S)
            except (TimeoutError, KafkaError):
                continue  # no position yet: nothing read that could be skipped
        reader = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, request_timeout_ms=int(PROBE_TIMEOUT_S * 1000)
        )
        try:
            await reader.start()
            # a topic some client's request created has the broker's default partition count
            recreated = sorted(
                topic
                for topic in {tp.topic for tp in assigned}
                if len(reader.partitions_for_topic(topic) or ()) != self._reply_partitions
            )
            ends = await log_ends(reader, list(positions), timeout_s=PROBE_TIMEOUT_S)
        except (TimeoutError, KafkaError, OSError):
            return False  # compared at the next probe
        finally:
            await close_consumer(reader)
        self._reconnecting = False
        if recreated:
            log.warning(
                "broker watch: reply topics %s came back with other than %d partitions: "
                "the broker began them anew",
                ", ".join(recreated),
                self._reply_partitions,
            )
            return True
        behind = sorted(
            f"{tp.topic}[{tp.partition}]" for tp, end in ends.items() if end < positions[tp]
        )
        if behind:
            log.warning(
                "broker watch: reply partitions %s end before this router's position: "
                "the broker began them anew",
                ", ".join(behind),
            )
        return bool(behind)

    def not_ready(self) -> str | None:
        """Why the router should get no traffic now (``GET /ready``), or None."""
        if not self.ready:
            return self._why
        return self.stalled or None

    def _check_stall(self) -> None:
        waited = self._replies.stalled_for(asyncio.get_running_loop().time())
        if waited > self._stall_s:
            if not self.stalled:
                log.warning(
                    "router not ready: %d callers waiting and no answer for %.0f s (workers "
                    "down or behind, or the broker not serving the reply topic)",
                    len(self._replies),
                    waited,
                )
            self.stalled = f"{len(self._replies)} callers waiting and no answer for {waited:.0f} s"
        elif self.stalled:
            log.info("router ready again: answers arrive")
            self.stalled = ""

    def _set_ready(self, ready: bool, why: str) -> None:
        self._why = "" if ready else why
        if ready != self.ready:
            self.ready = ready
            if ready:
                log.info("broker watch: %s; taking requests again", why)
            else:
                log.warning("broker watch: %s; new requests get a 503 until it is back", why)

    async def _create(self, missing: list[str]) -> bool:
        """Create lost topics at once, before producers that still have their metadata write to
        them (the broker keeps such writes and a topic created over them refuses produce
        requests for a while; see ``services.common.tansu.UNKNOWN_ERROR_RETRY_S``)."""
        try:
            await ensure_topics(
                self._bootstrap, missing, self._partitions, PROBE_TIMEOUT_S, self._layout
            )
        except Exception:
            log.exception("broker watch: could not create %s again", missing)
            return False
        return True

    async def _renew_reply_topic(self) -> None:
        """Delete what the broker holds of the reply topic, create it again, read it from the
        start. A failure is logged; the next probe finds the topic missing and tries again."""
        topic = [self._reply_topic()]
        try:
            # The broker keeps what was written to a topic it does not know, and deletes it only
            # with the topic: create it, delete it, create it again.
            args = (self._reply_partitions, PROBE_TIMEOUT_S, self._layout)
            await ensure_topics(self._bootstrap, topic, *args)
            await delete_topics(self._bootstrap, topic)
            await ensure_topics(self._bootstrap, topic, *args)
            consumer = self._reply_consumer()
            if consumer is not None and (assigned := consumer.assignment()):
                await consumer.seek_to_beginning(*assigned)
        except Exception:
            log.exception("broker watch: could not create the reply topic again")
            return
        self.renewed += 1
        # a client's metadata request between the delete and the create makes it with the
        # broker's default partition count: the next probe looks again
        self._reconnecting = True
        log.warning("broker watch: reply topic %s was lost; created it again", topic[0])

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
