"""`switchboard up` when a service's health port is taken before the service binds it: another
process's connection can get a port between its choice (``free_port``) and the bind. The service
is started again on a new port, and the stack comes up."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import switchboard.up as up_module
from services.common.routing_config import load_config
from switchboard.embedded import free_port
from switchboard.up import Stack, plan_from_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture
def busy_port() -> Iterator[int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


def test_a_service_whose_port_was_taken_starts_again_on_another(
    tmp_path: Path,
    busy_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(SWITCHBOARD_PORT=str(free_port()), SWITCHBOARD_DATA_DIR=str(tmp_path / "sb"))
    plan = plan_from_env(env)
    stack = Stack(plan, load_config(plan.config))
    calls = {"n": 0}

    def choose() -> int:  # the 6th port chosen is the shadow worker's (Stack.start's order)
        calls["n"] += 1
        return busy_port if calls["n"] == 6 else free_port()

    monkeypatch.setattr(up_module, "free_port", choose)
    started = stack.children  # the list Stack keeps: emptied by stop
    children = []
    try:
        stack.start()
        assert plan.ports["shadow"] != busy_port
        assert httpx.get(stack.ready_urls["shadow"], timeout=10).status_code == 200
        assert f"shadow: its port {busy_port} was taken" in capsys.readouterr().out
        alive = [c for c in started if c.name == "shadow"]
        assert len(alive) == 1 and alive[0].alive()
        children = list(started)
    finally:
        stack.stop()
    assert children and not any(c.alive() for c in children)
