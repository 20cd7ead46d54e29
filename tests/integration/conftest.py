"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from switchboard.embedded import Child, free_port, start_broker
from tests.integration.stack import Stack, running_stack


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
def own_broker(logs_dir: Path) -> Iterator[tuple[Child, str]]:
    """A broker for this test alone (the test may kill it): the process and its address."""
    port = free_port()
    child = start_broker(port, logs_dir)
    yield child, f"127.0.0.1:{port}"
    child.stop()
