"""The load generator's scheduling and accounting, against a small aiohttp server in the test.

The server runs on the test's own event loop, so a handler that blocks the loop also stalls the
generator: exactly the lag an open-loop generator must charge to latency rather than hide.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from bench.common import ROOT
from bench.loadgen import LoadSpec, Outcome, due_times, run_load, summarise
from switchboard.embedded import free_port

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@dataclass
class Server:
    url: str
    hits: dict[str, int] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    state = Server(f"http://127.0.0.1:{sock.getsockname()[1]}")

    async def handle(request: web.Request) -> web.Response:
        path = request.match_info["path"]
        state.hits[path] = state.hits.get(path, 0) + 1
        await request.read()
        if path == "fail":
            return web.json_response({"error": "boom"}, status=500)
        if path == "hang":
            await state.release.wait()  # outlives the client's timeout; released at teardown
        if path == "stall" and state.hits[path] == 1:
            time.sleep(0.2)  # noqa: ASYNC251 - blocks the shared loop on purpose
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{path}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


def spec(
    url: str, rate: float, duration_s: float, timeout_s: float = 5.0, warmup_s: float = 0.0
) -> LoadSpec:
    return LoadSpec(url, rate, duration_s, BODY, timeout_s=timeout_s, warmup_s=warmup_s)


def test_due_times_are_fixed_in_advance_and_evenly_spaced() -> None:
    assert due_times(10.0, 4, 5) == [10.0, 10.25, 10.5, 10.75, 11.0]


def test_latency_runs_from_the_due_time_not_the_send() -> None:
    # Sent 200 ms late and answered 50 ms later: 250 ms, of which 200 ms is the generator's lag.
    late = Outcome(due=0.0, started=0.2, finished=0.25, error=None)
    result = summarise([late], rate=10)
    assert result["p50_ms"] == pytest.approx(250.0)
    assert result["lag_max_ms"] == pytest.approx(200.0)


def test_achieved_rate_drops_when_requests_leave_late() -> None:
    on_time = [Outcome(i / 10, i / 10, i / 10 + 0.01, None) for i in range(10)]
    assert summarise(on_time, rate=10)["achieved_rps"] == pytest.approx(10.0)
    # The same ten requests all sent at t=1.9: the generator managed only half the rate.
    late = [Outcome(i / 10, 1.9, 1.95, None) for i in range(10)]
    assert summarise(late, rate=10)["achieved_rps"] == pytest.approx(5.0)


def test_errors_are_excluded_from_percentiles_and_counted_by_kind() -> None:
    outcomes = [
        Outcome(0.0, 0.0, 0.01, None),
        Outcome(0.1, 0.1, 0.2, "http_500"),
        Outcome(0.2, 0.2, 10.2, "timeout"),
        Outcome(0.3, 0.3, 10.3, "timeout"),
    ]
    result = summarise(outcomes, rate=10)
    assert (result["sent"], result["ok"], result["errors"]) == (4, 1, 3)
    assert result["error_rate"] == 0.75
    assert result["error_kinds"] == {"http_500": 1, "timeout": 2}
    assert result["p99_ms"] == pytest.approx(10.0)


async def test_sends_rate_times_duration_and_excludes_warmup(server: Server) -> None:
    result = await run_load(spec(f"{server.url}/ok", 100, 0.5, warmup_s=0.2))
    assert server.hits["ok"] == 70  # 20 warm-up + 50 measured, all of them reached the server
    assert (result["sent"], result["ok"], result["errors"]) == (50, 50, 0)
    assert result["achieved_rps"] == pytest.approx(100, rel=0.1)


async def test_non_200_answers_are_errors(server: Server) -> None:
    result = await run_load(spec(f"{server.url}/fail", 50, 0.2))
    assert result["errors"] == result["sent"] == 10
    assert result["error_kinds"] == {"http_500": 10}
    assert result["p50_ms"] is None  # no successful request, and still valid JSON


async def test_requests_past_the_timeout_are_errors(server: Server) -> None:
    started = time.perf_counter()
    result = await run_load(spec(f"{server.url}/hang", 20, 0.25, timeout_s=0.2))
    assert result["error_kinds"] == {"timeout": 5}
    # The last request is due at 0.2 s and gives up 0.2 s later; nothing waits for the server.
    assert time.perf_counter() - started < 2.0


async def test_refused_connections_are_errors() -> None:
    result = await run_load(spec(f"http://127.0.0.1:{free_port()}/x", 50, 0.1))
    assert result["errors"] == result["sent"] == 5
    assert list(result["error_kinds"]) == ["ClientConnectorError"]


async def test_a_stalled_loop_shows_in_latency_and_lag(server: Server) -> None:
    # The first answer blocks the loop 200 ms. A closed-loop client would record one slow call;
    # here the ~20 requests due during the stall leave late and their wait is counted.
    result = await run_load(spec(f"{server.url}/stall", 100, 0.5))
    assert result["sent"] == 50
    assert result["lag_max_ms"] >= 150
    assert result["p95_ms"] >= 100
    assert result["p50_ms"] < 100


async def test_log_has_one_line_per_request_warmup_flagged(server: Server, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    before = time.time()
    result = await run_load(spec(f"{server.url}/fail", 50, 0.2, warmup_s=0.1), log)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 15 == server.hits["fail"]  # 5 warm-up + 10 measured
    assert sum(line["warmup"] for line in lines) == 5
    assert {line["error"] for line in lines} == {"http_500"}
    dues = sorted(line["due"] for line in lines)
    assert before <= dues[0] < before + 1  # wall-clock seconds, not perf_counter's
    assert dues[-1] - dues[0] == pytest.approx(14 / 50, abs=0.002)  # the schedule, not the sends
    assert all(line["latency_ms"] > 0 for line in lines)
    assert result["sent"] == 10


async def test_cli_prints_one_json_line(server: Server, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        f"{server.url}/ok",
        "--rate",
        "50",
        "--duration",
        "0.4",
        "--body-file",
        str(body),
        "--header",
        "Authorization: Bearer k",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert (result["sent"], result["errors"], server.hits["ok"]) == (20, 0, 20)
    assert result["generator_cpu_s"] > 0
