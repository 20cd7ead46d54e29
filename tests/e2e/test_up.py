"""`switchboard up` as a user runs it: a subprocess, the official openai SDK, `switchboard sql`, Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from openai import OpenAI
from pydantic import BaseModel

from services.common.routing_config import load_config
from services.metrics.adapters.migrations import MIGRATIONS
from switchboard.embedded import free_port
from tests.e2e.canary_walkthrough import walk_through_a_canary
from tests.e2e.test_report_page import rendered_charts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def check_report_page(up: Up, data_dir: Path, state: dict[str, Any]) -> None:
    """The page from the CLI renders in Chromium; the metrics service serves it too, behind its
    key; every migration is recorded; the router exposes Prometheus series."""
    page = data_dir / "r.html"
    made = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "report", "--format", "html", "-o", str(page)],
        cwd=ROOT,
        env={**up.env, "SWITCHBOARD_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    charts = rendered_charts(page)
    assert all(charts.drawn[name] for name in ("latency-cdf", "over-time", "cost", "window-use"))
    assert {"sim-light", "sim-reasoning"} <= charts.legends["latency-cdf"]
    assert not charts.drawn["canary"]  # no experiment ran: the chart says so instead

    url, token = state["metrics_url"], state["metrics_token"]
    assert httpx.get(f"{url}/report", timeout=30).status_code == 401
    key = {"authorization": f"Bearer {token}"}
    served = httpx.get(f"{url}/report", params={"since": "1h"}, headers=key, timeout=60)
    assert served.status_code == 200 and 'id="chart-latency-cdf"' in served.text
    rows = httpx.get(f"{url}/report", params={"format": "json"}, headers=key, timeout=60).json()
    assert {(r["tier"], r["model"]) for r in rows} == {
        ("fast", "sim-light"),
        ("reasoning", "sim-reasoning"),
    }
    refused = httpx.get(f"{url}/report", params={"sinse": "1h"}, headers=key, timeout=30)
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "sinse")

    applied = httpx.post(
        f"{url}/query",
        json={"sql": "SELECT version FROM switchboard.schema_migrations FINAL ORDER BY version"},
        headers=key,
        timeout=30,
    ).json()["rows"]
    assert [v for (v,) in applied] == [m.version for m in MIGRATIONS]

    exposed = httpx.get(
        state["ready_urls"]["router"].removesuffix("/ready") + "/metrics", timeout=10
    )
    assert "switchboard_router_requests_total" in exposed.text
    assert "switchboard_router_request_duration_seconds_bucket" in exposed.text


class Up:
    def __init__(self, data_dir: Path, port: int, **env: str) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        full.update(
            SWITCHBOARD_PORT=str(port),
            SWITCHBOARD_DATA_DIR=str(data_dir),
            SWITCHBOARD_SIMULATOR_LATENCY_SCALE="0.05",
            PYTHONUNBUFFERED="1",
            **env,
        )
        for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
            full.pop(key, None)
        self.env = full
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "switchboard.cli", "up"],
            cwd=ROOT,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reader.join(10)
        code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Up, str, str, Path]]:
    data_dir = tmp_path / "sb"
    up = Up(data_dir, free_port())
    try:
        ready = up.wait_for_line(r"switchboard ready (http://\S+)", 240)
        key = up.wait_for_line(r"API key \(generated.*\): (sk-sb-\S+)", 5).group(1)
        yield up, ready.group(1), key, data_dir
    finally:
        up.stop()


async def kafka_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await asyncio.wait_for(admin.start(), 30)
    try:
        return list(await asyncio.wait_for(admin.list_topics(), 30))
    finally:
        await asyncio.wait_for(admin.close(), 30)


def sql(data_dir: Path, query: str, fmt: str = "json") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env["SWITCHBOARD_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "sql", query, "--format", fmt],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


class Triage(BaseModel):
    queue: Literal["billing", "refunds", "bugs"]
    priority: int


LOOKUP: Any = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
}


async def concurrent_streams(base_url: str, key: str, count: int) -> int:
    """``count`` streams at once; how many ended cleanly with text and usage."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120
    ) as sdk:

        async def one(i: int) -> bool:
            stream = await sdk.chat.completions.create(
                model="switchboard/auto",
                messages=[{"role": "user", "content": f"Stream number {i}"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            return f"Stream number {i}" in text and usage is not None and usage.total_tokens > 0

        done = await asyncio.gather(*(one(i) for i in range(count)))
    return sum(done)


def test_up_routes_with_the_openai_sdk_records_rows_and_stops_clean(
    stack: tuple[Up, str, str, Path],
) -> None:
    up, base_url, key, data_dir = stack
    assert "SIMULATOR" in "\n".join(up.lines)
    state = json.loads((data_dir / "run" / "stack.json").read_text())
    pids = list(state["pids"].values())
    # broker, redis, simulator, metrics, 4 workers, controller, shadow worker, router
    assert len(pids) == 11
    client = OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)

    short = client.chat.completions.with_raw_response.create(
        model="switchboard/auto", messages=[{"role": "user", "content": "Where is my parcel?"}]
    )
    deep = client.chat.completions.with_raw_response.create(
        model="switchboard/auto",
        messages=[
            {"role": "user", "content": "Plan a three-step migration of our billing database. " * 4}
        ],
        metadata={"requires_reasoning": "true", "tenant": "acme"},
    )
    assert short.headers["x-switchboard-tier"] == "fast"
    assert deep.headers["x-switchboard-tier"] == "reasoning"
    answer = short.parse()
    assert answer.choices[0].message.content and answer.usage and answer.usage.total_tokens > 0
    fast_tokens = answer.usage.total_tokens
    assert [m.id for m in client.models.list()][:2] == ["switchboard/auto", "fast"]

    ids = [short.headers["x-switchboard-request-id"], deep.headers["x-switchboard-request-id"]]
    query = (
        "SELECT request_id, tier, model, status, rule, route_score FROM switchboard.llm_events "
        f"WHERE request_id IN ('{ids[0]}', '{ids[1]}') ORDER BY tier"
    )
    deadline = time.monotonic() + 60
    rows: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        done = sql(data_dir, query)
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        if len(rows) == 2:
            break
        time.sleep(0.2)
    assert [(r["tier"], r["model"], r["status"]) for r in rows] == [
        ("fast", "sim-light", "ok"),
        ("reasoning", "sim-reasoning", "ok"),
    ]
    # the default config routes by the semantic stage: the row names the route and its score;
    # a request a rule decided before the stage has no score
    assert rows[0]["rule"].startswith("semantic:") and float(rows[0]["route_score"]) >= 0.4
    assert (rows[1]["rule"], rows[1]["route_score"]) == ("reasoning", None)
    table = sql(data_dir, "SELECT count() AS n FROM switchboard.llm_events", fmt="table")
    assert "n" in table.stdout and "(1 row)" in table.stdout
    refused = sql(data_dir, "DROP TABLE switchboard.llm_events")
    assert refused.returncode == 1 and "readonly" in refused.stderr.lower()

    # the embedded broker's keeper reports every topic; the router is ready and says so
    keeper_state = data_dir / "run" / "keeper.json"
    deadline = time.monotonic() + 30
    while not keeper_state.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    topics = json.loads(keeper_state.read_text())["topics"]
    assert {"switchboard.tier.fast.v1", "switchboard.events.v1"} <= set(topics)
    assert any(t.startswith("switchboard.replies.") and t.endswith(".s0") for t in topics)
    ready = httpx.get(f"{base_url}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}

    # every service says it is ready where stack.json says it answers, and is alive
    tiers = load_config(ROOT / "config" / "simulated.yaml").tier_names
    assert set(state["ready_urls"]) == {
        "router",
        "metrics",
        "controller",
        "shadow",
        *(f"worker-{t}" for t in tiers),
    }
    assert state["ready_urls"]["router"] == f"{base_url}/ready"
    for name, url in state["ready_urls"].items():
        answer = httpx.get(url, timeout=10)
        assert (answer.status_code, answer.json()) == (200, {"status": "ready"}), (name, answer)
        alive = httpx.get(url.removesuffix("/ready") + "/health", timeout=10)
        assert alive.status_code == 200, (name, alive)

    # the broker's address, in the banner and in stack.json, is where Kafka answers
    bootstrap = state["kafka_bootstrap"]
    banner = up.wait_for_line(r"Kafka bootstrap (\S+): jobs to (\S+) ", 5)
    assert banner.groups() == (bootstrap, "switchboard.ingress.v1")
    assert "switchboard.ingress.v1" in asyncio.run(kafka_topics(bootstrap))
    assert any(p.name.endswith(".member") for p in (data_dir / "run" / "fences").iterdir())

    # the decision matrix counts the two calls made above, each where it went, with figures
    report = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "report", "--format", "json"],
        cwd=ROOT,
        env={**up.env, "SWITCHBOARD_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    matrix = {(r["tier"], r["model"]): r for r in json.loads(report.stdout)}
    assert set(matrix) == {("fast", "sim-light"), ("reasoning", "sim-reasoning")}
    usage = {"fast": fast_tokens}
    for (tier, _), row in matrix.items():
        assert (row["requests"], row["attempts"], float(row["error_rate"])) == (1, 1, 0.0)
        assert 0 < float(row["p50_ms"]) <= float(row["p95_ms"]) <= float(row["p99_ms"])
        assert float(row["cost_usd"]) >= 0 and int(row["tokens_out"]) > 0
        assert 0 < row["window_use_max"] < 1  # the simulator's models have known windows
        if tier in usage:  # what the caller was told it used is what the row holds
            assert int(row["tokens_in"]) + int(row["tokens_out"]) == usage[tier]
    check_report_page(up, data_dir, state)

    # structured outputs and a tool call on the default config, with the SDK's own helpers
    parsed = client.chat.completions.parse(
        model="switchboard/auto",
        messages=[{"role": "user", "content": "My refund has not arrived"}],
        response_format=Triage,
    )
    assert isinstance(parsed.choices[0].message.parsed, Triage)
    asked = client.chat.completions.create(
        model="switchboard/auto",
        messages=[{"role": "user", "content": "Where is order A-17?"}],
        tools=[LOOKUP],
    )
    (call,) = asked.choices[0].message.tool_calls or []
    assert asked.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup_order" and "order_id" in json.loads(
        call.function.arguments
    )
    # the client answers the call; the model finishes with text
    finished = client.chat.completions.create(
        model="switchboard/auto",
        messages=[
            {"role": "user", "content": "Where is order A-17?"},
            asked.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'},
        ],
        tools=[LOOKUP],
    )
    assert finished.choices[0].finish_reason in ("stop", "length")
    assert finished.choices[0].message.content and not finished.choices[0].message.tool_calls
    # every other OpenAI parameter the default config's models take
    sampled = client.chat.completions.create(
        model="switchboard/auto",
        messages=[{"role": "user", "content": "Say hello"}],
        n=2,
        logprobs=True,
        top_logprobs=1,
        user="agent-7",
        metadata={"ticket": "T-1"},
        reasoning_effort="low",
        logit_bias={"50256": -100},
        seed=3,
        stop=["\n\n"],
    )
    assert len(sampled.choices) == 2
    assert all(c.logprobs and c.logprobs.content for c in sampled.choices)

    # streaming, with the SDK's own patterns: the same text as the whole answer, and usage
    greeting = [{"role": "user", "content": "Stream a short greeting"}]
    whole = client.chat.completions.create(model="switchboard/auto", messages=greeting, seed=5)
    streamed = list(
        client.chat.completions.create(
            model="switchboard/auto",
            messages=greeting,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content
    last = streamed[-1].usage
    assert last is not None and last.prompt_tokens > 0 and last.completion_tokens > 0
    with client.chat.completions.stream(model="switchboard/auto", messages=greeting) as helper:
        final = helper.get_final_completion()
    assert final.choices[0].message.content == text
    # a stream cut after its first token ends in an error event, not [DONE]
    simulator = state["simulator_url"]
    fault = {"model": "sim-light", "kind": "disconnect", "count": 1}
    httpx.post(f"{simulator}/simulator/faults", json=fault, timeout=10).raise_for_status()
    with httpx.stream(
        "POST",
        f"{base_url}/v1/chat/completions",
        json={"model": "fast", "messages": greeting, "stream": True},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    ) as cut:
        lines = [line for line in cut.iter_lines() if line.startswith("data: ")]
    assert "data: [DONE]" not in lines
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "stream_cut_off"
    # a hundred concurrent streams from AsyncOpenAI
    assert asyncio.run(concurrent_streams(base_url, key, 100)) == 100

    # the README's canary walkthrough, on this stack
    walk_through_a_canary(base_url, key, data_dir)

    assert up.stop() == 0
    time.sleep(0)  # children were waited for by the supervisor before it exited
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == []
    assert not (data_dir / "run" / "stack.json").exists()


def test_a_busy_port_fails_at_once_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        up = Up(tmp_path / "sb", busy.getsockname()[1])
        code = up.proc.wait(60)
        up.stop()
    assert code == 2
    assert any("already in use" in line for line in up.lines), up.lines
