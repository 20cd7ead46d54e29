"""The provider simulator over real HTTP: httpx, litellm and the openai SDK against uvicorn.

Each test starts its own server on a free port in a background thread, waits for ``/health``
and stops it at the end, so fault queues and statistics never leak between tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import openai

from services.simulator.__main__ import SimulatorServer, build_server
from services.simulator.config import SimulatorSettings

litellm.telemetry = False
litellm.suppress_debug_info = True

# Warnings litellm 1.106 itself triggers in pydantic (schema of a TypedDict with ``ReadOnly``
# items; ``model_fields`` / ``model_computed_fields`` read on an instance while streaming). They
# are litellm's to fix, and warnings are errors here, so the litellm tests ignore exactly these.
LITELLM_WARNINGS = [
    pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings(
        r"ignore:Accessing the 'model_\w+' attribute on the instance:DeprecationWarning"
    ),
]

MESSAGES = [{"role": "user", "content": "Summarise the routing table for the on-call engineer."}]
STARTUP_TIMEOUT_S = 10.0
# Bound of every wait on a condition; generous, since it is only reached when a test fails.
WAIT_TIMEOUT_S = 10.0


@contextmanager
def running_simulator(**settings: Any) -> Iterator[tuple[str, SimulatorServer]]:
    """A simulator on a free port (``latency_scale`` 0.01 unless given), stopped on exit."""
    settings.setdefault("latency_scale", 0.01)
    server = build_server(SimulatorSettings(host="127.0.0.1", port=0, **settings))
    # Bound here, so the port is known and never raced for. IPPROTO_TCP explicitly: asyncio sets
    # TCP_NODELAY only on sockets that say they are TCP, and Nagle would add 40 ms per request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_healthy(base, thread)
        yield base, server
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    assert not thread.is_alive(), "simulator did not shut down"


def _wait_healthy(base: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(base_url=base, timeout=1.0) as client:
        while True:
            try:
                if client.get("/health").json() == {"status": "ok", "simulator": True}:
                    return
            except httpx.TransportError:
                pass
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("simulator did not become healthy")
            time.sleep(0.01)  # poll interval, not a wait for readiness


@pytest.fixture
def simulator() -> Iterator[str]:
    with running_simulator() as (base, _):
        yield base


@pytest.fixture
async def http(simulator: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=simulator, timeout=10.0) as client:
        yield client


@pytest.fixture
async def litellm_clients() -> AsyncIterator[None]:
    """litellm caches its HTTP clients per process; close them before this test's loop ends."""
    yield
    from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

    await close_litellm_async_clients()
    litellm.in_memory_llm_clients_cache.flush_cache()


def _chat(model: str = "sim-light", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


def _sse_events(text: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


async def _queue(http: httpx.AsyncClient, kind: str, model: str = "*", count: int = 1) -> None:
    response = await http.post(
        "/simulator/faults", json={"model": model, "kind": kind, "count": count}
    )
    response.raise_for_status()


# --- plain HTTP -------------------------------------------------------------------------------


async def test_health_models_and_simulator_labels(http: httpx.AsyncClient) -> None:
    health = await http.get("/health")
    assert health.json() == {"status": "ok", "simulator": True}
    assert health.headers["server"] == "switchboard-simulator"
    models = (await http.get("/v1/models")).json()
    assert models["object"] == "list"
    ids = {m["id"] for m in models["data"]}
    expected = {"sim-light", "sim-balanced", "sim-balanced-next", "sim-reasoning", "sim-vision"}
    assert expected | {"sim-instant"} <= ids
    candidate = await http.post("/v1/chat/completions", json=_chat("openai/sim-balanced-next"))
    assert (candidate.status_code, candidate.json()["model"]) == (200, "sim-balanced-next")


async def test_completion_is_an_openai_chat_completion(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=_chat("openai/sim-light"))
    assert response.status_code == 200
    assert response.headers["server"] == "switchboard-simulator"
    body = response.json()
    assert body["id"].startswith("chatcmpl-sim-")
    assert (body["object"], body["model"]) == ("chat.completion", "sim-light")
    assert body["system_fingerprint"] == "switchboard-simulator"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Simulated answer from sim-light to: Summarise")
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == -(-len(MESSAGES[0]["content"]) // 4)
    assert usage["completion_tokens"] == len(choice["message"]["content"].split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_max_tokens_caps_the_answer(http: httpx.AsyncClient) -> None:
    body = (await http.post("/v1/chat/completions", json=_chat(max_tokens=7))).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7
    assert len(body["choices"][0]["message"]["content"].split()) == 7


async def test_stream_matches_the_non_streamed_answer(http: httpx.AsyncClient) -> None:
    request = _chat(max_tokens=30, stream=True, stream_options={"include_usage": True})
    response = await http.post("/v1/chat/completions", json=request)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 30
    content_chunks = [c for c in chunks[1:-2] if c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) > 3  # several tokens per chunk, but not one chunk for all
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
    plain = (await http.post("/v1/chat/completions", json=_chat(max_tokens=30))).json()
    assert streamed == plain["choices"][0]["message"]["content"]


async def test_n_choices_and_logprobs_streamed_match_the_plain_answer(
    http: httpx.AsyncClient,
) -> None:
    asked = {"max_tokens": 12, "n": 2, "logprobs": True, "top_logprobs": 3}
    plain = (await http.post("/v1/chat/completions", json=_chat(**asked))).json()
    assert [c["index"] for c in plain["choices"]] == [0, 1]
    texts = [c["message"]["content"] for c in plain["choices"]]
    assert texts[0] != texts[1]  # two samples, not one twice
    assert plain["usage"]["completion_tokens"] == 24
    entries = plain["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == texts[0]
    assert all(len(e["top_logprobs"]) == 3 and e["logprob"] <= 0 for e in entries)
    response = await http.post("/v1/chat/completions", json=_chat(stream=True, **asked))
    chunks = [e for e in _sse_events(response.text) if e != "[DONE]"]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content") or "" for c in mine) == texts[index]
        assert mine[-1]["finish_reason"] == "length"
        tokens = [e["token"] for c in mine if c["logprobs"] for e in c["logprobs"]["content"]]
        assert "".join(tokens) == texts[index]


async def test_stream_without_usage_option_has_no_usage_chunk(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=_chat(stream=True))
    chunks = _sse_events(response.text)[:-1]
    assert all(c["choices"] and "usage" not in c for c in chunks)


async def test_unknown_model_is_an_openai_404(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=_chat("openai/gpt-9"))
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "model",
        "model_not_found",
    )
    assert "gpt-9" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "sim-light"}', "messages"),
        (b'{"model": "sim-light", "messages": []}', "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "sim-light", "messages": [{"content": "x"}]}', "messages.0.role"),
        (b'{"model": "sim-light", "messages": [{"role": "user"}], "max_tokens": 0}', "max_tokens"),
        (b"{not json", None),
    ],
)
async def test_bad_requests_are_openai_400s(
    http: httpx.AsyncClient, body: bytes, param: str | None
) -> None:
    response = await http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


# --- faults -----------------------------------------------------------------------------------


async def test_queued_faults_are_served_fifo_then_stats_count_them(
    http: httpx.AsyncClient,
) -> None:
    await _queue(http, "429", model="sim-light", count=2)
    await _queue(http, "500", model="*")
    balanced = await http.post("/v1/chat/completions", json=_chat("sim-balanced"))
    assert balanced.status_code == 500  # "*" matches, sim-light's 429s do not
    assert balanced.json()["error"]["type"] == "server_error"
    statuses = []
    for _ in range(3):
        response = await http.post("/v1/chat/completions", json=_chat())
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert statuses == [429, 429, 200]
    stats = (await http.get("/simulator/stats")).json()
    light = stats["models"]["sim-light"]
    assert (light["requests"], light["completed"], light["faults"]["429"]) == (3, 1, 2)
    assert stats["models"]["sim-balanced"]["faults"]["500"] == 1
    assert stats["queued_faults"] == []


async def test_clearing_faults_and_rejecting_unknown_models(http: httpx.AsyncClient) -> None:
    await _queue(http, "500", count=5)
    assert (await http.delete("/simulator/faults")).json() == {"cleared": 5}
    assert (await http.post("/v1/chat/completions", json=_chat())).status_code == 200
    bad_model = await http.post("/simulator/faults", json={"model": "nope", "kind": "429"})
    assert bad_model.status_code == 404
    bad_kind = await http.post("/simulator/faults", json={"kind": "418"})
    assert (bad_kind.status_code, bad_kind.json()["error"]["param"]) == (400, "kind")


async def test_fault_header_affects_one_request(http: httpx.AsyncClient) -> None:
    failing = await http.post(
        "/v1/chat/completions", json=_chat(), headers={"x-simulator-fault": "500"}
    )
    assert failing.status_code == 500
    assert (await http.post("/v1/chat/completions", json=_chat())).status_code == 200
    bogus = await http.post(
        "/v1/chat/completions", json=_chat(), headers={"x-simulator-fault": "teapot"}
    )
    assert (bogus.status_code, bogus.json()["error"]["param"]) == (400, "x-simulator-fault")


async def test_disconnect_drops_the_connection(http: httpx.AsyncClient) -> None:
    await _queue(http, "disconnect")
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post("/v1/chat/completions", json=_chat())
    await _queue(http, "disconnect")
    received: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as resp:
            assert resp.status_code == 200
            async for chunk in resp.aiter_bytes():
                received.append(chunk)
    events = _sse_events(b"".join(received).decode())
    # the role, then the first token, then nothing: a stream cut after its first token
    assert len(events) == 2 and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert (
        events[1]["choices"][0]["delta"]["content"] and not events[1]["choices"][0]["finish_reason"]
    )
    assert (await http.post("/v1/chat/completions", json=_chat())).status_code == 200


async def test_timeout_fault_outlasts_the_client(http: httpx.AsyncClient) -> None:
    await _queue(http, "timeout", model="sim-light")
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/v1/chat/completions", json=_chat(), timeout=0.3)
    assert (await http.post("/v1/chat/completions", json=_chat())).status_code == 200
    stats = (await http.get("/simulator/stats")).json()["models"]["sim-light"]
    assert (stats["faults"]["timeout"], stats["completed"]) == (1, 1)


async def test_a_hanging_request_does_not_hold_the_shutdown() -> None:
    with running_simulator() as (base, server):
        async with httpx.AsyncClient(base_url=base, timeout=60.0) as client:
            await _queue(client, "timeout")
            hanging = asyncio.create_task(client.post("/v1/chat/completions", json=_chat()))
            for _ in range(500):  # poll until the server holds the request
                stats = (await client.get("/simulator/stats")).json()
                if stats["models"]["sim-light"]["faults"]["timeout"]:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the hanging request never reached the simulator")
            started = time.monotonic()
            server.should_exit = True
            with pytest.raises(httpx.RemoteProtocolError):
                await hanging
            assert time.monotonic() - started < 3.0


async def test_seeded_profile_rates_from_a_profiles_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n  sim-flaky: {ttft_s: 0.1, tokens_per_s: 100, output_tokens: 10, "
        "error_rate_429: 0.5}\n"
    )

    async def statuses() -> list[int]:
        with running_simulator(profiles_file=path, seed=3) as (base, _):
            async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
                return [
                    (await client.post("/v1/chat/completions", json=_chat("sim-flaky"))).status_code
                    for _ in range(12)
                ]

    first = await statuses()
    assert set(first) == {200, 429}
    assert await statuses() == first  # same seed, same faults


# --- latency ----------------------------------------------------------------------------------


async def _timed_completion(base: str, model: str) -> float:
    async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
        started = time.perf_counter()
        response = await client.post("/v1/chat/completions", json=_chat(model))
        response.raise_for_status()
        return time.perf_counter() - started


async def test_latency_scale_shrinks_and_keeps_profile_shapes(simulator: str) -> None:
    assert await _timed_completion(simulator, "sim-light") < 0.5
    with running_simulator(latency_scale=0.25) as (base, _):
        light = await _timed_completion(base, "sim-light")
        reasoning = await _timed_completion(base, "sim-reasoning")
    assert 0.8 * 0.25 * 0.85 <= light < 0.8 * 0.25 * 5
    assert reasoning >= 4.0 * 0.25 * 0.85 and reasoning > 2 * light


# --- runtime profiles -------------------------------------------------------------------------

SLOW_TTFT_S = 0.3


async def _profiles(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/simulator/profiles")
    response.raise_for_status()
    body = response.json()
    assert body["simulator"] is True
    profiles: dict[str, Any] = body["profiles"]
    return profiles


async def _statuses(http: httpx.AsyncClient, model: str, count: int = 3) -> list[int]:
    return [
        (await http.post("/v1/chat/completions", json=_chat(model))).status_code
        for _ in range(count)
    ]


async def _wait_for_stats(
    http: httpx.AsyncClient, condition: Callable[[dict[str, Any]], bool], what: str
) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not condition((await http.get("/simulator/stats")).json()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # poll interval, not a wait for the condition


async def test_profiles_list_every_model_and_round_trip(http: httpx.AsyncClient) -> None:
    profiles = await _profiles(http)
    models = {m["id"] for m in (await http.get("/v1/models")).json()["data"]}
    assert set(profiles) == models
    assert profiles["sim-balanced-next"] == {
        "ttft_s": 0.4,
        "tokens_per_s": 90.0,
        "output_tokens": 88,
        "jitter": 0.1,
        "error_rate_429": 0.0,
        "error_rate_500": 0.0,
        "timeout_rate": 0.0,
        "quality": {
            "maths": 0.65,
            "reasoning": 0.65,
            "coding": 0.8,
            "extraction": 1.0,
            "classification": 1.0,
            "support": 1.0,
            "writing": 1.0,
            "chit_chat": 1.0,
            "other": 1.0,
        },
    }
    assert profiles["sim-instant"]["tokens_per_s"] == "inf"  # JSON has no infinity
    same = await http.patch("/simulator/profiles/sim-instant", json=profiles["sim-instant"])
    assert same.json() == {"model": "sim-instant", "profile": profiles["sim-instant"]}


async def test_a_patched_error_rate_fails_requests_until_reset(http: httpx.AsyncClient) -> None:
    original = (await _profiles(http))["sim-light"]
    patched = await http.patch("/simulator/profiles/openai/sim-light", json={"error_rate_500": 1})
    assert patched.status_code == 200
    assert patched.json() == {"model": "sim-light", "profile": {**original, "error_rate_500": 1.0}}
    assert (await _profiles(http))["sim-light"]["error_rate_500"] == 1.0
    failing = await http.post("/v1/chat/completions", json=_chat())
    assert (failing.status_code, failing.json()["error"]["type"]) == (500, "server_error")
    assert await _statuses(http, "sim-light") == [500, 500, 500]
    assert await _statuses(http, "sim-balanced") == [200, 200, 200]  # other models untouched
    light = (await http.get("/simulator/stats")).json()["models"]["sim-light"]
    assert (light["requests"], light["completed"], light["faults"]["500"]) == (4, 0, 4)

    reset = await http.post("/simulator/profiles/openai/sim-light/reset")
    assert reset.status_code == 200
    assert reset.json() == {"model": "sim-light", "profile": original}
    assert (await _profiles(http))["sim-light"] == original
    assert await _statuses(http, "sim-light") == [200, 200, 200]


async def test_patches_merge_over_the_current_profile(http: httpx.AsyncClient) -> None:
    first = await http.patch("/simulator/profiles/sim-light", json={"error_rate_429": 0.7})
    assert first.status_code == 200
    # 0.7 + 0.5 > 1 only because the first patch is kept: the merged profile is validated
    refused = await http.patch("/simulator/profiles/sim-light", json={"error_rate_500": 0.5})
    assert refused.status_code == 400
    assert "must be <= 1" in refused.json()["error"]["message"]
    both = await http.patch(
        "/simulator/profiles/sim-light", json={"error_rate_429": 0, "error_rate_500": 0.5}
    )
    assert both.status_code == 200
    profile = both.json()["profile"]
    assert (profile["error_rate_429"], profile["error_rate_500"]) == (0.0, 0.5)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"ttft": 3.0}, "ttft", "Unrecognized parameter: 'ttft'"),
        ({"ttft_s": -1}, "ttft_s", "greater than or equal to 0"),
        ({"error_rate_500": "often"}, "error_rate_500", "'error_rate_500'"),
        ({"error_rate_429": 1.5}, "error_rate_429", "less than or equal to 1"),
        ({"output_tokens": None}, "output_tokens", "'output_tokens'"),
        ({"error_rate_429": 0.6, "error_rate_500": 0.6}, None, "must be <= 1"),
        ([1, 2], None, "JSON object"),
    ],
)
async def test_bad_profile_patches_are_400s_that_change_nothing(
    http: httpx.AsyncClient, body: Any, param: str | None, message: str
) -> None:
    before = await _profiles(http)
    response = await http.patch("/simulator/profiles/sim-light", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert message in error["message"]
    assert await _profiles(http) == before


async def test_profile_endpoints_refuse_unknown_models(http: httpx.AsyncClient) -> None:
    responses = [
        await http.patch("/simulator/profiles/openai/gpt-9", json={"ttft_s": 1.0}),
        await http.post("/simulator/profiles/gpt-9/reset"),
    ]
    for response in responses:
        assert response.status_code == 404
        error = response.json()["error"]
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            "model",
            "model_not_found",
        )
        assert "gpt-9" in error["message"]


async def test_a_patched_ttft_delays_the_answers_that_follow() -> None:
    # sim-instant has no jitter and no pacing: at latency_scale 1 an answer waits ttft_s exactly.
    with running_simulator(latency_scale=1.0) as (base, _):
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            patch = {"ttft_s": SLOW_TTFT_S}
            (await client.patch("/simulator/profiles/sim-instant", json=patch)).raise_for_status()
            slow = await _timed_completion(base, "sim-instant")
            started = time.perf_counter()
            stream = _chat("sim-instant", stream=True)
            async with client.stream("POST", "/v1/chat/completions", json=stream) as response:
                first_line = await anext(aiter(response.aiter_lines()))
                first_chunk = time.perf_counter() - started
            assert first_line.startswith("data: ")
            (await client.post("/simulator/profiles/sim-instant/reset")).raise_for_status()
        fast = await _timed_completion(base, "sim-instant")
    assert slow >= SLOW_TTFT_S and first_chunk >= SLOW_TTFT_S
    assert fast < SLOW_TTFT_S  # the reset is what made it fast again


async def test_requests_in_flight_keep_the_profile_they_started_with() -> None:
    with running_simulator(latency_scale=1.0) as (base, _):
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            patch = {"ttft_s": SLOW_TTFT_S}
            (await client.patch("/simulator/profiles/sim-instant", json=patch)).raise_for_status()
            started = time.perf_counter()
            in_flight = asyncio.create_task(
                client.post("/v1/chat/completions", json=_chat("sim-instant"))
            )
            # counted means planned: the plan is made in the same step as the count
            await _wait_for_stats(
                client,
                lambda stats: stats["models"]["sim-instant"]["requests"] == 1,
                "the first request to reach the simulator",
            )
            (await client.post("/simulator/profiles/sim-instant/reset")).raise_for_status()
            fast = await _timed_completion(base, "sim-instant")
            response = await asyncio.wait_for(in_flight, timeout=WAIT_TIMEOUT_S)
            slow = time.perf_counter() - started
    assert response.status_code == 200
    assert slow >= SLOW_TTFT_S  # planned before the reset, served as planned
    assert fast < SLOW_TTFT_S


# --- litellm and the openai SDK ---------------------------------------------------------------


@pytest.mark.usefixtures("litellm_clients")
class TestLiteLLM:
    """litellm's ``openai/`` provider, exactly as the workers call it."""

    pytestmark = LITELLM_WARNINGS

    @staticmethod
    def args(simulator: str, model: str = "openai/sim-light", **extra: Any) -> dict[str, Any]:
        return {
            "model": model,
            "api_base": f"{simulator}/v1",
            "api_key": "x",
            "messages": MESSAGES,
            "num_retries": 0,
            **extra,
        }

    async def test_non_streaming(self, simulator: str) -> None:
        response = await litellm.acompletion(**self.args(simulator, max_tokens=12))
        assert response.choices[0].message.content.startswith("Simulated answer from sim-light")
        assert response.choices[0].finish_reason == "length"
        assert response.usage.completion_tokens == 12
        assert response.system_fingerprint == "switchboard-simulator"

    async def test_streaming_with_usage(self, simulator: str) -> None:
        stream = await litellm.acompletion(
            **self.args(
                simulator,
                "openai/sim-balanced",
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("Simulated answer from sim-balanced")
        usage = [c.usage for c in chunks if getattr(c, "usage", None)]
        assert usage and usage[-1].completion_tokens == len(text.split())
        assert usage[-1].prompt_tokens > 0

    async def test_simulated_faults_map_to_litellm_errors(self, simulator: str) -> None:
        async with httpx.AsyncClient(base_url=simulator) as http:
            await _queue(http, "429")
            await _queue(http, "500")
        with pytest.raises(litellm.RateLimitError):
            await litellm.acompletion(**self.args(simulator, max_retries=0))
        with pytest.raises((litellm.InternalServerError, litellm.APIError)):
            await litellm.acompletion(**self.args(simulator, max_retries=0, stream=True))
        with pytest.raises(litellm.NotFoundError):
            await litellm.acompletion(**self.args(simulator, "openai/gpt-9", max_retries=0))


async def test_openai_sdk(simulator: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{simulator}/v1", api_key="x", max_retries=0) as sdk:
        completion = await sdk.chat.completions.create(model="sim-vision", messages=MESSAGES)
        assert completion.system_fingerprint == "switchboard-simulator"
        assert completion.usage is not None and completion.usage.total_tokens > 0
        stream = await sdk.chat.completions.create(
            model="sim-light",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None and chunks[-1].choices == []
        models = await sdk.models.list()
        assert "sim-reasoning" in {m.id for m in models.data}
        async with httpx.AsyncClient(base_url=simulator) as http:
            await _queue(http, "429")
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(model="sim-light", messages=MESSAGES)


def test_listening_line_is_printed_once_bound(capfd: pytest.CaptureFixture[str]) -> None:
    with running_simulator() as (base, _):
        pass
    out = capfd.readouterr().out
    assert f"switchboard provider simulator listening on {base} (simulated models: sim-light" in out
