"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from switchboard.embedded import Child, free_port, start_broker
from tests.integration.stack import Infra, Stack, StackOf, running_stack


@pytest.fixture
def infra(
    kafka_bootstrap: str,
    redis_url: str,
    topic_prefix: str,
    tmp_path: Path,
    chdb_data_dir: Path,
    simulator_url: str,
) -> Infra:
    return Infra(kafka_bootstrap, redis_url, topic_prefix, tmp_path, chdb_data_dir, simulator_url)


@pytest.fixture
async def fast_stack(
    kafka_bootstrap: str,
    redis_url: str,
    topic_prefix: str,
    routing_config: Path,
    chdb_data_dir: Path,
) -> AsyncIterator[Stack]:
    """The services in this process with one worker, for tier ``fast``."""
    async with running_stack(
        kafka_bootstrap, redis_url, topic_prefix, routing_config, chdb_data_dir, ["fast"]
    ) as stack:
        yield stack


@pytest.fixture
def stack_of(
    kafka_bootstrap: str, redis_url: str, topic_prefix: str, tmp_path: Path, chdb_data_dir: Path
) -> StackOf:
    """``stack_of(config_yaml, tiers)``: the services in this process on a routing config of
    the test's own, with one worker per tier named."""

    def make(config: str, tiers: list[str]) -> AbstractAsyncContextManager[Stack]:
        path = tmp_path / "routing.yaml"
        path.write_text(config)
        return running_stack(kafka_bootstrap, redis_url, topic_prefix, path, chdb_data_dir, tiers)

    return make


@pytest.fixture
def own_broker(logs_dir: Path) -> Iterator[tuple[Child, str]]:
    """A broker for this test alone (the test may kill it): the process and its address."""
    port = free_port()
    child = start_broker(port, logs_dir)
    yield child, f"127.0.0.1:{port}"
    child.stop()
