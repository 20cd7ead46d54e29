"""Live routing config: a service swaps its config without restarting.

Two ways in:

* ``switchboard config apply FILE`` publishes the file's text to the config topic (one
  partition, compacted). Every router, worker, controller and shadow worker reads that topic
  from its start and offers each record to ``apply``.
* SIGHUP makes the service read its own config file (``SWITCHBOARD_CONFIG``) again.

Whatever comes in is validated first with this process's environment (``${ENV}``
references). A config that does not load, or that this service cannot take (a worker whose
tier it drops), is refused: the reason is logged, counted in ``refused``, and the config in
force keeps serving. At start the newest record of the topic is applied only when it was
published after the config file last changed: a restart picks up what was applied to the
fleet, and a deployment with a newer file is not overridden by an older apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from schemas.control import ConfigUpdate
from services.common.consumer import close_consumer, follow
from services.common.control import ensure_control_topic
from services.common.kafka import partitions_of
from services.common.routing_config import ConfigError, LoadedConfig, load_config_text
from services.common.topic_layout import TopicLayout

log = logging.getLogger(__name__)

_FETCH_WAIT_MS = 500
CONFIG_KEY = "routing"


class Refused(ValueError):
    """A valid config this service cannot take (its ``apply`` says why)."""


class ConfigWatch:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        client_id: str,
        current: LoadedConfig,
        apply: Callable[[LoadedConfig], None],
        layout: TopicLayout | None = None,
    ) -> None:
        self._bootstrap, self._topic, self._client_id = bootstrap, topic, client_id
        self._layout = layout
        self.current = current
        self._apply = apply
        self._file = Path(current.path)
        self.applied = 0
        self.refused = 0
        self.last_refusal = ""
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._hup = False

    async def start(self, sighup: bool = True) -> None:
        await ensure_control_topic(self._bootstrap, self._topic, self._layout)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            enable_auto_commit=False,
            fetch_max_wait_ms=_FETCH_WAIT_MS,
            max_partition_fetch_bytes=8 << 20,
        )
        await consumer.start()
        try:
            tps = [
                TopicPartition(self._topic, p) for p in await partitions_of(consumer, self._topic)
            ]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            newest = await _newest(consumer, ends)
        except BaseException:
            await close_consumer(consumer)
            raise
        if newest is not None and newest.at > self._file_changed_at():
            self.offer(newest.text, self._origin(newest))
        self._consumer = consumer
        self._task = asyncio.create_task(
            follow(consumer, self._record, "the config topic"), name="config-watch"
        )
        if sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_file)
            self._hup = True

    def _file_changed_at(self) -> datetime:
        try:
            return datetime.fromtimestamp(self._file.stat().st_mtime, UTC)
        except OSError:
            return datetime.min.replace(tzinfo=UTC)

    def _record(self, record: ConsumerRecord) -> None:
        update = _parse(record.value)
        if update is not None:
            self.offer(update.text, self._origin(update))

    def _origin(self, update: ConfigUpdate) -> str:
        return f"{self._topic} (applied by {update.by or '?'} from {update.source or '?'})"

    def reload_file(self) -> None:
        """SIGHUP: the config file again."""
        try:
            text = self._file.read_text()
        except OSError as exc:
            self._refuse(f"{self._file}: cannot read: {exc.strerror or exc}")
            return
        self.offer(text, str(self._file))

    def offer(self, text: str, origin: str) -> bool:
        """Validate ``text`` and apply it; False (logged, counted) when it is refused."""
        try:
            config = load_config_text(text, origin)
        except ConfigError as exc:
            self._refuse(str(exc))
            return False
        if config.hash == self.current.hash:
            return True
        try:
            self._apply(config)
        except Refused as exc:
            self._refuse(f"{origin}: {exc}")
            return False
        log.info("config %s from %s applied (was %s)", config.hash, origin, self.current.hash)
        self.current = config
        self.applied += 1
        return True

    def _refuse(self, reason: str) -> None:
        self.refused += 1
        self.last_refusal = reason
        log.error("config refused, %s still serving: %s", self.current.hash, reason)

    async def stop(self) -> None:
        if self._hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._hup = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await close_consumer(self._consumer)
            self._consumer = None


async def newest_applied(bootstrap: str, topic: str, client_id: str) -> ConfigUpdate | None:
    """The config last applied to the fleet (the config topic's newest record), if any."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        enable_auto_commit=False,
        fetch_max_wait_ms=_FETCH_WAIT_MS,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(consumer, topic)]
        if not tps:
            return None
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        return await _newest(consumer, await consumer.end_offsets(tps))
    finally:
        await close_consumer(consumer)


async def _newest(
    consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]
) -> ConfigUpdate | None:
    """Read the assigned partitions up to ``ends``; the newest readable record."""
    newest: ConfigUpdate | None = None
    if not any(ends.values()):
        return None  # nothing was ever applied: no fetch to wait for
    async with asyncio.timeout(30):
        while not await _at(consumer, ends):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    newest = _parse(record.value) or newest
    return newest


def in_force(file_config: LoadedConfig, applied: ConfigUpdate | None) -> LoadedConfig:
    """What a process that starts now serves: the applied config if it is newer than the file
    (and loads here), else the file's (the rule ``ConfigWatch.start`` follows)."""
    if applied is None:
        return file_config
    try:
        changed = datetime.fromtimestamp(Path(file_config.path).stat().st_mtime, UTC)
    except OSError:
        changed = datetime.min.replace(tzinfo=UTC)
    if applied.at <= changed:
        return file_config
    try:
        return load_config_text(applied.text, f"the applied config (from {applied.source or '?'})")
    except ConfigError:
        return file_config


async def _at(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


def _parse(value: bytes | None) -> ConfigUpdate | None:
    try:
        return ConfigUpdate.model_validate_json(value or b"")
    except ValidationError:
        log.warning("config topic: an unreadable record, skipped")
        return None
