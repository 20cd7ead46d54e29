"""Fixtures that start the real parts: the Tansu broker, Redis, the provider simulator.

Each is a child process started once per session and stopped at its end; each test gets its own
topic prefix, so tests never see each other's messages.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from switchboard.embedded import (
    Child,
    free_port,
    python_service,
    start_broker,
    start_redis,
    wait_for,
)
from tests.hangs import print_tasks

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# the tests' broker is the embedded one, which has no idempotent producers (services/common/tansu.py)
os.environ.setdefault("SWITCHBOARD_KAFKA_IDEMPOTENCE", "false")
ROOT = Path(__file__).resolve().parents[1]
DUMP_BEFORE_TIMEOUT_S = 10


@pytest.fixture(autouse=True)
async def dump_tasks_before_timeout(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Print what every asyncio task awaits shortly before pytest-timeout stops a hung test."""
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker else request.config.getini("timeout"))

    at = limit - DUMP_BEFORE_TIMEOUT_S
    handle = asyncio.get_running_loop().call_later(at, print_tasks, f"{at:.0f} s into the test")
    yield
    handle.cancel()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def kafka_bootstrap(logs_dir: Path) -> Iterator[str]:
    port = free_port()
    child = start_broker(port, logs_dir)
    yield f"127.0.0.1:{port}"
    child.stop()


@pytest.fixture(scope="session")
def redis_url(logs_dir: Path) -> Iterator[str]:
    port = free_port()
    child = start_redis(port, logs_dir)
    yield f"redis://127.0.0.1:{port}/0"
    child.stop()


def start_simulator(logs_dir: Path, scale: str = "0.02") -> tuple[Child, str]:
    port = free_port()
    env = {
        **os.environ,
        "SWITCHBOARD_SIMULATOR_PORT": str(port),
        "SWITCHBOARD_SIMULATOR_LATENCY_SCALE": scale,
        "PYTHONUNBUFFERED": "1",
    }
    child = python_service(f"simulator-{port}", ["simulator"], env, logs_dir)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("simulator", healthy, 60, child.alive)
    return child, url


@pytest.fixture(scope="session")
def simulator_url(logs_dir: Path) -> Iterator[str]:
    child, url = start_simulator(logs_dir)
    yield url
    child.stop()


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def routing_config(tmp_path: Path, simulator_url: str) -> Path:
    """The shipped simulated config, pointed at this session's simulator."""
    text = (ROOT / "config" / "simulated.yaml").read_text()
    text = text.replace("${SWITCHBOARD_SIMULATOR_URL:-http://127.0.0.1:8090}", simulator_url)
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    shutil.copy(ROOT / "config" / "routes.json", tmp_path / "routes.json")  # its classifier
    return path


@pytest.fixture(scope="session")
def chdb_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chDB lets a process open one data directory, so every in-process test shares this one."""
    return tmp_path_factory.mktemp("switchboard-data")
