"""The control topic: where each experiment stands, read by every router, written by the
controller and by operators (``switchboard canary``).

One partition, compacted on Kafka, keyed by experiment name: a reader that starts reads it from
the beginning and keeps the newest ``ExperimentState`` of each experiment (the highest
``version``; at equal versions the later record). ``LiveExperiments`` turns the config and those
states into the share in force for each tier's experiment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from pydantic import ValidationError

from schemas.control import ExperimentState
from schemas.v1 import ChatRequest, ExperimentTag
from services.common import experiments
from services.common.consumer import close_consumer, follow
from services.common.kafka import Publisher, partitions_of
from services.common.routing_config import Experiment, LoadedConfig
from services.common.topic_layout import TopicLayout

log = logging.getLogger(__name__)

_FETCH_WAIT_MS = 200  # how long a fetch waits for a new state: the worst case of noticing one
CATCH_UP_S = 30.0  # how long a reader waits to read the topic up to its end on start


async def ensure_control_topic(
    bootstrap: str, topic: str, layout: TopicLayout | None = None
) -> None:
    """Create a compacted topic of one partition (the control or the config topic), if it does
    not exist yet; ``layout`` gives its replicas and sizes."""
    layout = layout or TopicLayout()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        if topic in set(await admin.list_topics()):
            return
        with contextlib.suppress(TopicAlreadyExistsError):
            configs = {**layout.configs(topic), "cleanup.policy": "compact"}
            configs.pop("retention.ms", None)
            await admin.create_topics(
                [NewTopic(topic, 1, layout.replication_factor, topic_configs=configs)]
            )
    finally:
        await admin.close()


async def publish_state(publisher: Publisher, topic: str, state: ExperimentState) -> None:
    await publisher.publish(topic, state, key=state.experiment)


class ControlReader:
    """The newest state of each experiment, from the control topic, kept current.

    ``start`` returns once the topic is read up to the end it had then, so a router serves its
    first request with the shares in force. ``on_change`` is called with each state applied.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        client_id: str,
        on_change: Callable[[ExperimentState], None] | None = None,
    ) -> None:
        self._bootstrap, self._topic, self._client_id = bootstrap, topic, client_id
        self._on_change = on_change
        self.states: dict[str, ExperimentState] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self._ends: dict[TopicPartition, int] = {}

    async def start(self, catch_up_s: float = CATCH_UP_S) -> None:
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
            await consumer.seek_to_beginning(*partitions)
            self._ends = {tp: end for tp, end in (await consumer.end_offsets(partitions)).items()}
        except BaseException:
            await close_consumer(consumer)
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._read(consumer), name="control")
        await self._check_caught_up(consumer)
        try:
            await asyncio.wait_for(self._caught_up.wait(), catch_up_s)
        except TimeoutError:
            log.warning("control topic %s not read to its end in %g s", self._topic, catch_up_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await close_consumer(self._consumer)
            self._consumer = None

    async def _check_caught_up(self, consumer: AIOKafkaConsumer) -> None:
        if self._caught_up.is_set():
            return
        if not any(self._ends.values()):  # an empty topic: read to its end already
            self._caught_up.set()
            return
        for tp, end in self._ends.items():
            if await consumer.position(tp) < end:
                return
        self._caught_up.set()

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        await follow(
            consumer, self._record, "the control topic", lambda: self._check_caught_up(consumer)
        )

    def _record(self, record: ConsumerRecord) -> None:
        try:
            state = ExperimentState.model_validate_json(record.value or b"")
        except ValidationError:
            log.warning("control topic: unreadable record at %s", record.offset)
            return  # every router reads this topic: none of them dead-letters
        self.apply(state)

    def apply(self, state: ExperimentState) -> None:
        known = self.states.get(state.experiment)
        if known is not None and known.version > state.version:
            return
        self.states[state.experiment] = state
        if self._on_change is not None:
            self._on_change(state)


def share_in_force(experiment: Experiment, state: ExperimentState | None) -> float:
    """The candidate's share: the state's, when it is about this candidate; else the config's
    starting share. A rolled-back experiment has none."""
    if state is None or state.candidate != experiment.candidate:
        return experiment.spec.start_share
    return 0.0 if state.status == "rolled_back" else state.share_pct


class LiveExperiments:
    """Which variant of its tier's experiment a request is on, by the states read so far."""

    def __init__(self, config: LoadedConfig, states: dict[str, ExperimentState]) -> None:
        self.config = config
        self.states = states  # a ControlReader's, kept current by it

    def tag(self, tier: str, request: ChatRequest) -> ExperimentTag | None:
        experiment = self.config.experiment_of_tier.get(tier)
        if experiment is None:
            return None
        share = share_in_force(experiment, self.states.get(experiment.name))
        if share <= 0:
            return None
        tag = experiments.tag(experiment.name, request, experiment.spec.sticky, share)
        if experiment.spec.mode == "shadow":
            # the tier answers every request; the share on the candidate's side is mirrored
            return (
                tag.model_copy(update={"variant": "baseline"})
                if tag.variant == "candidate"
                else None
            )
        return tag
