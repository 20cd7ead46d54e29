"""``switchboard config apply FILE``: give the running fleet a new routing config.

The file is validated here first (as ``check-config`` does); a config that does not load is
refused with its reason and nothing is sent. Then its text goes to the config topic, and every
router, worker, controller and shadow worker validates it again with its own environment and
applies it (services/common/config_watch.py). With `switchboard up` running, the command waits
until the router answers ``/health`` with the new hash.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import sys
import time
from pathlib import Path

import httpx
from aiokafka.errors import KafkaError

from schemas.control import ConfigUpdate
from services.common import fences
from services.common.config_watch import CONFIG_KEY
from services.common.control import ensure_control_topic
from services.common.kafka import ProducerPublisher
from services.common.routing_config import ConfigError, load_config
from services.metrics.config import MetricsSettings
from switchboard.analyst import stack_file

ROUTER_WAIT_S = 15.0


async def _publish(bootstrap: str, run_dir: Path | None, topic: str, update: ConfigUpdate) -> None:
    await ensure_control_topic(bootstrap, topic)
    holds = fences.for_process(run_dir, run_dir is not None, "config-cli")
    publisher = ProducerPublisher(bootstrap, "switchboard-config", holds)
    if holds is not None:
        await holds.start()
    await publisher.start()
    try:
        await publisher.publish(topic, update, key=CONFIG_KEY)
    finally:
        await publisher.stop()
        if holds is not None:
            await holds.stop()


def _router_serves(base_url: str, config_hash: str) -> bool:
    deadline = time.monotonic() + ROUTER_WAIT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=5).json().get("config_hash") == config_hash:
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    return False


def apply_command(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"config apply: refused, nothing sent: {exc}", file=sys.stderr)
        return 2
    settings = MetricsSettings()
    state_file = stack_file(settings.data_dir)
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    bootstrap = state.get("kafka_bootstrap") or settings.kafka_bootstrap
    run_dir = state_file.parent if state else None
    update = ConfigUpdate(
        text=Path(path).read_text(),
        config_hash=config.hash,
        source=str(Path(path).resolve()),
        by=f"{getpass.getuser()}@{socket.gethostname()}",
    )
    try:
        asyncio.run(_publish(bootstrap, run_dir, settings.topics.config, update))
    except (OSError, KafkaError) as exc:
        print(f"config apply: cannot reach Kafka at {bootstrap}: {exc}", file=sys.stderr)
        return 1
    print(f"config {config.hash} from {path} sent to {settings.topics.config}")
    if state.get("base_url"):
        if not _router_serves(state["base_url"], config.hash):
            print(
                f"config apply: the router does not serve {config.hash} after "
                f"{ROUTER_WAIT_S:g} s; its log says why (.switchboard/logs/router.log)",
                file=sys.stderr,
            )
            return 1
        print(f"the router serves {config.hash}")
    return 0
