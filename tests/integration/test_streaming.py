"""``stream=true`` through Kafka on the real stack (broker, Redis, chDB, simulator), with the
official openai SDK: chunks from the worker through the reply topic to server-sent events, the
same text as the whole answer, usage on request, tool-call deltas, an error before the first
token hidden by the in-tier fallback, and a stream cut after it ending in an error event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.router.service import idempotent_request_id
from tests.conftest import start_simulator
from tests.integration.stack import (
    API_KEY,
    Stack,
    StackOf,
    collect,
    openai_sdk,
    produce,
    wait_until,
)
from tests.integration.test_structured import LOOKUP

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def stack(fast_stack: Stack) -> Stack:
    return fast_stack


def events(text: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


async def queue_fault(simulator_url: str, model: str, kind: str) -> None:
    async with httpx.AsyncClient(base_url=simulator_url) as http:
        response = await http.post(
            "/simulator/faults", json={"model": model, "kind": kind, "count": 1}
        )
        response.raise_for_status()


async def test_a_streamed_answer_is_the_whole_answer_in_chunks_with_usage(stack: Stack) -> None:
    messages = [{"role": "user", "content": f"Stream me a greeting {uuid.uuid4().hex[:6]}"}]
    async with openai_sdk(stack) as sdk:
        whole = await sdk.chat.completions.create(model="fast", messages=messages)
        stream = await sdk.chat.completions.create(
            model="fast", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == whole.choices[0].message.content
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens > 0 and usage.usage.prompt_tokens > 0
    assert usage.usage.total_tokens == whole.usage.total_tokens if whole.usage else False
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].model == "sim-light"


async def test_the_sdk_stream_helper_and_tool_call_deltas(stack: Stack) -> None:
    async with openai_sdk(stack) as sdk:
        async with sdk.chat.completions.stream(
            model="fast",
            messages=[{"role": "user", "content": "Where is order A-17?"}],
            tools=[LOOKUP],  # type: ignore[list-item]
        ) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup_order" and "order_id" in json.loads(
        call.function.arguments
    )
    assert "tool_calls.function.arguments.done" in kinds


async def test_an_error_before_the_first_token_falls_back_unseen(
    stack: Stack, simulator_url: str
) -> None:
    await queue_fault(simulator_url, "sim-light", "500")
    await queue_fault(simulator_url, "sim-light", "500")  # and its one retry
    async with httpx.AsyncClient(base_url=stack.base_url, headers=AUTH, timeout=60) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
    assert response.status_code == 200
    seen = events(response.text)
    assert seen[-1] == "[DONE]" and not any("error" in e for e in seen[:-1])
    assert seen[0]["model"] == "sim-balanced"  # the tier's next model
    assert response.headers["x-switchboard-model"] == "sim-balanced"


async def test_a_stream_cut_after_its_first_token_ends_in_an_error_event(
    stack: Stack, simulator_url: str
) -> None:
    await queue_fault(simulator_url, "sim-light", "disconnect")
    async with httpx.AsyncClient(base_url=stack.base_url, headers=AUTH, timeout=60) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
    request_id = response.headers["x-switchboard-request-id"]
    seen = events(response.text)
    assert "[DONE]" not in seen
    assert seen[0]["choices"][0]["delta"]["content"]  # the token the model sent
    assert seen[-1]["error"]["code"] == "stream_cut_off"
    # the official SDK raises on it
    await queue_fault(simulator_url, "sim-light", "disconnect")
    async with openai_sdk(stack) as sdk:
        stream = await sdk.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="broke off"):
            async for _ in stream:
                pass

    async def cut_row() -> list[list[object]]:
        sql = f"SELECT status, model FROM switchboard.llm_events WHERE request_id = '{request_id}'"
        _, rows = await stack.metrics.store.query(sql)
        return rows

    assert await wait_until(cut_row, what="the cut-off row") == [["cut_off", "sim-light"]]


async def test_an_error_before_any_chunk_is_an_ordinary_http_error(stack: Stack) -> None:
    # a schema the models cannot use: every model of the tier refuses it before a token
    broken = {"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}, "required": ["a"]}
    body = {
        "model": "fast",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": broken}},
    }
    async with httpx.AsyncClient(base_url=stack.base_url, headers=AUTH, timeout=60) as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "all_models_failed"


async def test_over_kafka_stream_true_is_a_dead_letter_and_a_chat_error(stack: Stack) -> None:
    topics = stack.topics
    request_id = f"stream-{uuid.uuid4().hex}"
    job = {"request_id": request_id, "messages": [{"role": "user", "content": "hi"}]}
    await produce(stack.bootstrap, topics.ingress, json.dumps({**job, "stream": True}).encode())
    (error,) = await collect(stack.bootstrap, topics.results, lambda seen: len(seen) >= 1)
    assert (error["request_id"], error["code"]) == (request_id, "invalid_request")
    assert "served over HTTP" in error["message"]
    (letter,) = await collect(stack.bootstrap, topics.dead_letter, lambda seen: len(seen) >= 1)
    assert "stream" in letter["reason"]


# --- a client that leaves ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_simulator(logs_dir: Path) -> Any:
    """A simulator at real speed (sim-light: 250 ms to the first token, 550 ms of tokens), so
    a client can leave in the middle of an answer."""
    child, url = start_simulator(logs_dir, scale="1")
    yield url
    child.stop()


@pytest.fixture
async def slow_stack(stack_of: StackOf, slow_simulator: str) -> AsyncIterator[Stack]:
    config = (
        "version: 1\ntiers:\n  fast:\n    interactive: true\n    timeout_s: 30\n    models:\n"
        f"      - model: openai/sim-light\n        name: sim-light\n"
        f"        api_base: {slow_simulator}/v1\n"
        "rules: []\ndefault: fast\n"
    )
    async with stack_of(config, ["fast"]) as running:
        yield running


async def row_status(stack: Stack, request_id: str) -> list[list[object]]:
    sql = f"SELECT status, error_code FROM switchboard.llm_events WHERE request_id = '{request_id}'"
    _, rows = await stack.metrics.store.query(sql)
    return rows


async def test_a_client_leaving_mid_stream_cancels_the_model_call(slow_stack: Stack) -> None:
    worker = slow_stack.workers["fast"].service
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(base_url=slow_stack.base_url, headers=AUTH, timeout=60) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            request_id = response.headers["x-switchboard-request-id"]
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # the first chunk: now leave, half a second before the answer ends
    rows = await wait_until(lambda: row_status(slow_stack, request_id), what="the row")
    assert rows == [["cancelled", "client_left"]]
    assert worker.cancelled == 1


async def test_a_client_leaving_before_the_first_token_cancels_too(
    slow_stack: Stack, slow_simulator: str
) -> None:
    await queue_fault(slow_simulator, "sim-light", "timeout")  # the call hangs: no token comes
    key = f"leave-{uuid.uuid4().hex}"
    request_id = idempotent_request_id(None, key)
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    worker = slow_stack.workers["fast"].service

    async def waiting() -> None:
        headers = {**AUTH, "idempotency-key": key}
        async with httpx.AsyncClient(base_url=slow_stack.base_url, headers=headers) as http:
            await http.post("/v1/chat/completions", json=body, timeout=60)

    async def in_flight() -> bool:
        async with httpx.AsyncClient(base_url=slow_simulator) as http:
            stats = (await http.get("/simulator/stats")).json()
        return stats["models"]["sim-light"]["faults"].get("timeout", 0) >= 1

    caller = asyncio.ensure_future(waiting())
    await wait_until(in_flight, what="the call to hang in the simulator")
    caller.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await caller
    rows = await wait_until(lambda: row_status(slow_stack, request_id), what="the row")
    assert rows == [["cancelled", "client_left"]] and worker.cancelled == 1


async def test_a_caller_joining_a_stream_under_its_key_gets_the_whole_answer(
    slow_stack: Stack,
) -> None:
    headers = {**AUTH, "idempotency-key": f"join-{uuid.uuid4().hex}"}
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    first_chunk = asyncio.Event()

    async def first_caller(http: httpx.AsyncClient) -> list[Any]:
        lines = []
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    first_chunk.set()
        return events("\n".join(lines))

    def text(seen: list[Any]) -> str:
        bodies = [e for e in seen if isinstance(e, dict) and e.get("choices")]
        return "".join(b["choices"][0]["delta"].get("content") or "" for b in bodies)

    async with httpx.AsyncClient(base_url=slow_stack.base_url, headers=headers, timeout=60) as http:
        first = asyncio.ensure_future(first_caller(http))
        await asyncio.wait_for(first_chunk.wait(), 30)
        joined = await http.post("/v1/chat/completions", json=body)  # mid-stream, same key
        streamed = await asyncio.wait_for(first, 30)
    whole = events(joined.text)
    assert streamed[-1] == "[DONE]" and whole[-1] == "[DONE]"
    assert len([e for e in streamed if isinstance(e, dict)]) > 2  # the first caller's chunks
    assert len(whole) == 2 and text(whole) == text(streamed)  # one chunk, then [DONE]
