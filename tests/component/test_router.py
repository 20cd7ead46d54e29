"""The router's handlers on FastStream's in-memory broker: HTTP in, routed message out, reply back."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from faststream.kafka import TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from schemas.v1 import ChatResult, RoutedRequest, Usage
from services.router.app import create_app
from services.router.config import RouterSettings
from tests.integration.stack import wait_until

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-component"
AUTH = {"authorization": f"Bearer {KEY}"}


def settings(**extra: Any) -> RouterSettings:
    return RouterSettings(
        config=ROOT / "config" / "simulated.yaml", api_key=KEY, topic_prefix="comp", **extra
    )


@pytest.fixture
async def wired() -> AsyncIterator[
    tuple[httpx.AsyncClient, list[RoutedRequest], list[dict[str, Any]]]
]:
    """An app whose tiers are answered by an in-memory stand-in worker."""
    app = create_app(settings())
    broker = app.state.broker
    topics = app.state.ctx.router.topics
    routed: list[RoutedRequest] = []
    dead: list[dict[str, Any]] = []
    gate = asyncio.Event()  # the stand-in worker answers while it is set
    gate.set()

    async def answer(msg: KafkaMessage) -> None:
        request = RoutedRequest.model_validate_json(msg.body)
        routed.append(request)
        await gate.wait()
        result = ChatResult(
            request_id=request.request_id,
            tier=request.tier,
            model="stand-in",
            provider="test",
            rule=request.rule,
            config_hash=request.config_hash,
            attempts=1,
            latency_ms=1.0,
            completion={
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
            },
            usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
        )
        await broker.publish(result.model_dump_json().encode(), topic=request.reply_to)

    for tier in app.state.ctx.router.config.tier_names:
        broker.subscriber(topics.tier(tier))(answer)

    # the app's reply reader is a plain aiokafka consumer, started with the lifespan (which
    # ASGITransport does not run): the in-memory broker hands replies to its handler instead
    @broker.subscriber(app.state.ctx.reply_topics.current)
    async def on_reply(msg: KafkaMessage) -> None:
        await app.state.on_reply(msg.raw_message)

    @broker.subscriber(topics.dead_letter)
    async def on_dead(msg: KafkaMessage) -> None:
        dead.append(json.loads(msg.body))

    async with TestKafkaBroker(broker):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://router", headers=AUTH
        ) as c:
            c.app = app  # type: ignore[attr-defined]
            c.gate = gate  # type: ignore[attr-defined]
            yield c, routed, dead


async def _now(value: bool) -> bool:
    return value


def chat(content: Any = "Hello", **body: Any) -> dict[str, Any]:
    return {"model": "switchboard/auto", "messages": [{"role": "user", "content": content}], **body}


TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Find an order",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}},
    },
}
TOOL_CALL = {"name": "lookup", "arguments": '{"order": "A-1"}'}


def named(function: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": function}}


async def test_http_request_is_classified_published_and_answered(wired: Any) -> None:
    client, routed, _ = wired
    resp = await client.post("/v1/chat/completions", json=chat("Hello", metadata={"tenant": "t1"}))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-switchboard-tier"] == "fast"
    assert resp.headers["x-switchboard-model"] == "stand-in"
    assert resp.json()["id"] == resp.headers["x-switchboard-request-id"] == routed[0].request_id
    # the shipped config's semantic stage decided, and its score went with the request
    assert routed[0].rule == "semantic:chit_chat" and routed[0].reply_to.startswith("comp.replies.")
    assert routed[0].route_score is not None and routed[0].route_score >= 0.4
    assert routed[0].config_hash == resp.headers["x-switchboard-config-hash"]
    assert routed[0].deadline_at is not None


async def test_forced_tier_and_idempotency_key(wired: Any) -> None:
    client, routed, _ = wired
    headers = {"idempotency-key": "order-42"}
    client.gate.clear()  # the answer waits until both callers are in
    first = asyncio.create_task(
        client.post("/v1/chat/completions", json=chat(model="reasoning"), headers=headers)
    )
    await wait_until(lambda: _now(bool(routed)), 10, "the first caller to publish")
    second = asyncio.create_task(
        client.post("/v1/chat/completions", json=chat(model="reasoning"), headers=headers)
    )
    waiting = client.app.state.ctx.replies._waiting[routed[0].request_id]
    await wait_until(lambda: _now(waiting.callers == 2), 10, "the second caller to join")
    client.gate.set()
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.headers["x-switchboard-tier"] == "reasoning"
    assert a.headers["x-switchboard-rule"] == "forced"
    assert a.headers["x-switchboard-request-id"] == b.headers["x-switchboard-request-id"]
    assert len(routed) == 1  # published once: the second caller joined the first
    assert a.json() == b.json()


async def test_a_caller_sharing_a_key_with_other_content_gets_a_422(wired: Any) -> None:
    client, routed, _ = wired
    headers = {"idempotency-key": "order-43"}
    client.gate.clear()
    first = asyncio.create_task(
        client.post("/v1/chat/completions", json=chat("one thing"), headers=headers)
    )
    await wait_until(lambda: _now(bool(routed)), 10, "the first caller to publish")
    other = await client.post("/v1/chat/completions", json=chat("another"), headers=headers)
    client.gate.set()
    assert (await asyncio.wait_for(first, 10)).status_code == 200
    assert other.status_code == 422
    error = other.json()["error"]
    assert error["param"] == "Idempotency-Key" and error["code"] == "idempotency_key_reused"
    assert len(routed) == 1


async def test_models_lists_the_tiers_and_the_models_with_capabilities(wired: Any) -> None:
    client, _, _ = wired
    data = (await client.get("/v1/models")).json()["data"]
    ids = [m["id"] for m in data]
    assert ids[:5] == ["switchboard/auto", "fast", "balanced", "reasoning", "vision"]
    assert set(ids[5:]) == {"sim-light", "sim-balanced", "sim-reasoning", "sim-vision"}
    by_id = {m["id"]: m for m in data}
    assert by_id["vision"]["capabilities"]["vision"] and not by_id["fast"]["capabilities"]["vision"]
    light = by_id["sim-light"]
    assert (light["tier"], light["tiers"], light["aliases"]) == (
        "fast",
        ["fast", "balanced"],
        ["openai/sim-light"],
    )
    assert light["capabilities"] == {
        "tools": True,
        "json_schema": True,
        "vision": False,
        "context_window": 128000,
    }
    assert by_id["sim-balanced"]["tier"] == "balanced"  # the tier that tries it first


@pytest.mark.parametrize(
    ("model", "tier", "rule", "pinned"),
    [
        ("sim-balanced", "balanced", "pinned", "sim-balanced"),
        ("openai/sim-light", "fast", "pinned", "sim-light"),
        ("reasoning", "reasoning", "forced", None),
        ("switchboard/auto", "fast", "semantic:chit_chat", None),
    ],
)
async def test_a_model_name_pins_the_model_through_its_tier(
    wired: Any, model: str, tier: str, rule: str, pinned: str | None
) -> None:
    client, routed, _ = wired
    response = await client.post("/v1/chat/completions", json=chat(model=model))
    assert response.status_code == 200, response.text
    (sent,) = routed
    assert (sent.tier, sent.rule, sent.pinned) == (tier, rule, pinned)
    assert response.headers["x-switchboard-rule"] == rule


async def test_a_pinned_model_without_a_capability_is_refused_by_name(wired: Any) -> None:
    client, routed, _ = wired
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    body = chat([{"type": "text", "text": "what is this?"}, image], model="sim-light")
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and routed == []
    error = response.json()["error"]
    assert error["code"] == "unsupported_capability" and "sim-light" in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "switchboard/auto"}, "messages", "missing_required_parameter"),
        (chat(model="gpt-9"), "model", "model_not_found"),
        (chat(model="sim-Light"), "model", "model_not_found"),
        ({"model": "switchboard/auto", "messages": []}, "messages", "invalid_value"),
        (
            {"model": "switchboard/auto", "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
            "invalid_value",
        ),
        (chat(temperature=7), "temperature", "invalid_value"),
        (chat(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
        (chat(stream=True, stream_options={"include_usage": 3}), "stream_options", "invalid_value"),
        (
            chat(stream=True, stream_options={"include_obfuscation": False}),
            "stream_options.include_obfuscation",
            "invalid_value",
        ),
        (chat(audio={"voice": "alloy"}), "audio", "unsupported_parameter"),
        (chat(tools=[{"type": "function"}]), "tools[0].function", "missing_required_parameter"),
        (chat(tools=[TOOL], tool_choice=named("other")), "tool_choice", "invalid_value"),
        (chat(tool_choice="required"), "tool_choice", "invalid_value"),
        (chat(response_format={"type": "xml"}), "response_format", "invalid_value"),
        (chat(functions=[TOOL["function"]]), "functions", "unsupported_parameter"),
        (
            {"model": "switchboard/auto", "messages": [{"role": "tool", "content": "{}"}]},
            "messages[0]",
            "invalid_value",
        ),
        (
            {
                "model": "switchboard/auto",
                "messages": [
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [{"id": "c1", "type": "function", "function": TOOL_CALL}],
                    }
                ],
            },
            "messages[0]",
            "invalid_value",
        ),
        (chat(top_logprobs=3), "top_logprobs", "invalid_value"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
        (chat(n=0), "n", "invalid_value"),
        (chat(logit_bias={"token": 5}), "logit_bias", "invalid_value"),
        (chat(logit_bias={"50256": 101}), "logit_bias", "invalid_value"),
        (chat(reasoning_effort="maximal"), "reasoning_effort", "invalid_value"),
        (chat(user="u" * 300), "user", "invalid_value"),
        (chat(metadata={"order": 17}), "metadata", "invalid_value"),
        (chat(metadata={f"k{i}": "v" for i in range(17)}), "metadata", "invalid_value"),
        (chat(verbosity="high"), "verbosity", "unsupported_parameter"),
        (chat(frobnicate=1), "frobnicate", "unknown_parameter"),
        (chat(metadata={"priority": 99}), "metadata.priority", "invalid_value"),
        (chat(metadata={"deadline_ms": 10**15}), "metadata.deadline_ms", "invalid_value"),
        (chat(metadata={"deadline_ms": 0}), "metadata.deadline_ms", "invalid_value"),
        (chat(max_tokens=10**9), "max_tokens", "invalid_value"),
        (chat(max_completion_tokens=0), "max_completion_tokens", "invalid_value"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
        (chat(seed=2**64), "seed", "invalid_value"),
        (chat(presence_penalty=3), "presence_penalty", "invalid_value"),
        (
            chat(metadata={"tags": {f"k{i}": "v" for i in range(40)}}),
            "metadata.tags",
            "invalid_value",
        ),
        (chat(metadata={"deadline_ms": "soon"}), "metadata.deadline_ms", "invalid_value"),
        (chat([{"type": "image_url", "image_url": {}}]), "messages[0].content", "invalid_value"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(
    wired: Any, body: Any, param: str, code: str
) -> None:
    client, routed, _ = wired
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(param) and error["code"] == code
    assert error["message"]
    assert routed == []


@pytest.mark.parametrize(
    "body",
    [chat(stream=False, n=1, logprobs=False, tools=[], response_format={"type": "text"})],
)
async def test_parameters_that_ask_for_nothing_are_accepted(wired: Any, body: Any) -> None:
    client, routed, _ = wired
    assert routed == []
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert len(routed) == 1


SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["bug", "billing"]}},
    "required": ["label"],
    "additionalProperties": False,
}


async def test_tools_and_a_json_schema_are_carried_to_the_tier_as_sent(wired: Any) -> None:
    client, routed, _ = wired
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": TOOL_CALL}],
    }
    body = chat(
        tools=[TOOL],
        tool_choice=named("lookup"),
        parallel_tool_calls=False,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "triage", "schema": SCHEMA, "strict": True},
        },
    )
    body["messages"] += [assistant, {"role": "tool", "tool_call_id": "c1", "content": "{}"}]
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    # as the worker sends it on: the wire form, unset fields left out
    wire = RoutedRequest.model_validate_json(routed[0].model_dump_json())
    request = wire.request.model_dump(mode="json", exclude_none=True)
    assert request["tools"] == [TOOL] and request["tool_choice"] == named("lookup")
    assert request["parallel_tool_calls"] is False
    assert request["response_format"]["json_schema"] == {
        "name": "triage",
        "schema": SCHEMA,
        "strict": True,
    }
    assert request["messages"][1]["tool_calls"][0]["function"] == TOOL_CALL
    assert request["messages"][2]["tool_call_id"] == "c1"
    assert routed[0].request.has_tools and routed[0].request.wants_json


async def test_an_unexpected_error_is_an_openai_shaped_500_with_the_request_id(
    wired: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client, routed, _ = wired

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OverflowError("date value out of range")

    monkeypatch.setattr(client.app.state.ctx.router, "route", broken)
    resp = await client.post("/v1/chat/completions", json=chat(), headers={"idempotency-key": "k"})
    assert resp.status_code == 500
    error = resp.json()["error"]
    request_id = resp.headers["x-switchboard-request-id"]
    assert request_id.startswith("sbr-idem-") and request_id in error["message"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    logged = [r for r in caplog.records if r.exc_info and request_id in r.getMessage()]
    assert len(logged) == 1 and "OverflowError" in caplog.text
    assert routed == []


async def test_invalid_json_and_auth(wired: Any) -> None:
    client, _, _ = wired
    resp = await client.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    for headers, code in (
        ({"authorization": ""}, "missing_api_key"),
        ({"authorization": "Bearer wrong"}, "invalid_api_key"),
        ({"authorization": "Basic abc"}, "missing_api_key"),
    ):
        resp = await client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == code


async def test_oversized_body_is_413(wired: Any) -> None:
    client, _, _ = wired
    resp = await client.post("/v1/chat/completions", json=chat("x" * (9 * 1024 * 1024)))
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


async def test_oversized_chunked_body_is_413_without_reading_it_all(wired: Any) -> None:
    """No content-length (a chunked upload): the limit holds on the bytes as they arrive."""
    client, routed, _ = wired
    chunk = b"x" * (1024 * 1024)
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"model": "switchboard/auto", "messages": [{"role": "user", "content": "'
        for _ in range(64):  # 64 MiB offered, far over the 8 MiB limit
            sent += 1
            yield chunk
        yield b'"}]}'

    resp = await client.post(
        "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413
    error = resp.json()["error"]
    assert error["code"] == "request_too_large" and str(8 * 1024 * 1024) in error["message"]
    assert routed == []  # nothing was routed
    assert sent < 64  # the rest of the upload was never read


async def test_a_chunked_body_under_the_limit_is_served(wired: Any) -> None:
    client, routed, _ = wired

    async def body() -> AsyncIterator[bytes]:
        raw = json.dumps(chat("hello in pieces")).encode()
        for i in range(0, len(raw), 7):
            yield raw[i : i + 7]

    resp = await client.post(
        "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 200, resp.text
    assert len(routed) == 1


async def test_framework_errors_are_openai_shaped_and_say_what_was_wrong(wired: Any) -> None:
    """Found by the fuzzer: a body that is not UTF-8 got FastAPI's {"detail": ...}."""
    client, routed, _ = wired
    resp = await client.post(
        "/v1/chat/completions",
        content=b'{"model": "switchboard/auto", "messages": "\xff\xfe"}',
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "invalid_body" and "UnicodeDecodeError" in error["message"]
    resp = await client.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "no such endpoint: GET /v1/nothing-here"
    resp = await client.delete("/v1/chat/completions")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"
    assert routed == []


def image(url: str) -> list[dict[str, Any]]:
    text = {"type": "text", "text": "what is this?"}
    return [text, {"type": "image_url", "image_url": {"url": url}}]


def data_url(size: int, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(b"\x89" * size).decode()


async def test_image_parts_over_the_limit_or_malformed_are_400s_naming_the_part(
    wired: Any,
) -> None:
    client, routed, _ = wired
    limit = settings().max_image_bytes
    refused = {
        data_url(limit + 1): "image_too_large",
        "data:image/png;base64,%%%%": "invalid_image_url",
        data_url(10, "bmp"): "invalid_image_format",
        "ftp://example.com/cat.png": "invalid_image_url",
    }
    for url, code in refused.items():
        resp = await client.post("/v1/chat/completions", json=chat(image(url)))
        assert resp.status_code == 400, (url[:40], resp.text)
        error = resp.json()["error"]
        assert (error["code"], error["param"]) == (code, "messages[0].content[1].image_url.url")
        assert error["param"] in error["message"]
        if code == "image_too_large":
            assert f"{limit + 1} bytes is over the limit of {limit} bytes" in error["message"]
    assert routed == []
    for url in (data_url(limit), "https://example.com/cat.png"):
        resp = await client.post("/v1/chat/completions", json=chat(image(url)))
        assert resp.status_code == 200, resp.text
    assert len(routed) == 2


async def test_while_the_broker_watch_says_kafka_is_away_requests_get_a_503_unsent(
    wired: Any,
) -> None:
    client, routed, _ = wired
    client.app.state.ctx.broker_ready = lambda: False
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "broker_unavailable"
    assert "not sent" in resp.json()["error"]["message"] and routed == []


async def test_ready_says_why_when_the_router_should_get_no_traffic(wired: Any) -> None:
    client, _, _ = wired
    ok = await client.get("/ready")
    assert ok.status_code == 200 and ok.json() == {"status": "ready"}
    client.app.state.ctx.not_ready = lambda: "3 callers waiting and no answer for 61 s"
    down = await client.get("/ready")
    assert down.status_code == 503
    assert down.json() == {
        "status": "not ready",
        "reason": "3 callers waiting and no answer for 61 s",
    }


async def test_a_body_nested_too_deep_is_a_400(wired: Any) -> None:
    client, routed, _ = wired
    deep = b'{"model": "fast", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = await client.post(
        "/v1/chat/completions", content=deep, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert routed == []


async def test_past_the_cap_of_waiting_callers_a_request_gets_503_with_retry_after(
    wired: Any,
) -> None:
    client, routed, _ = wired
    ctx = client.app.state.ctx
    ctx.max_waiting = 1
    future, _ = ctx.replies.expect("someone-waiting")  # one caller already waits
    try:
        resp = await client.post("/v1/chat/completions", json=chat())
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["code"] == "overloaded"
        assert routed == []
    finally:
        ctx.replies.leave("someone-waiting", future)
    assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200
