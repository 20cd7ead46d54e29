"""The two ends of a streamed answer, without Kafka: the worker's ``ChunkStream`` (coalescing,
merging, numbering) and the router's ``StreamRelay`` (each chunk once, in order, from one
stream; a clean end only when every chunk of that stream was shown)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.v1 import ChatError, ChatResult, StreamChunk, StreamMark, Usage
from services.router.streaming import DONE, StreamRelay
from services.workers.stream import MAX_COALESCE_S, ChunkStream, window_s

pytestmark = pytest.mark.timeout(30)


def chunk(seq: int, text: str, stream: str = "s1", finish: str | None = None) -> StreamChunk:
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
    return StreamChunk(request_id="r1", stream=stream, seq=seq, model="m", choices=[choice])


def result(stream: StreamMark | None, text: str = "abc") -> ChatResult:
    message = {"role": "assistant", "content": text}
    return ChatResult(
        request_id="r1",
        tier="fast",
        model="m",
        provider="openai",
        rule="r",
        config_hash="h",
        attempts=1,
        latency_ms=1.0,
        completion={"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]},
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        stream=stream,
    )


def decoded(events: list[bytes]) -> list[Any]:
    out = []
    for event in events:
        body = event.decode().removeprefix("data: ").strip()
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


def text_of(events: list[bytes]) -> str:
    bodies = [e for e in decoded(events) if isinstance(e, dict) and e.get("choices")]
    return "".join(b["choices"][0]["delta"].get("content") or "" for b in bodies)


def test_chunks_are_shown_once_in_order_then_usage_and_done() -> None:
    relay = StreamRelay("r1", 0, include_usage=True)
    shown = relay.take(chunk(1, "b"))  # early: held
    assert shown == []
    shown += relay.take(chunk(0, "a"))
    shown += relay.take(chunk(0, "a"))  # a repeat: dropped
    shown += relay.take(chunk(2, "c", finish="stop"))
    assert text_of(shown) == "abc" and relay.ignored == 1
    end = decoded(relay.finish(result(StreamMark(id="s1", chunks=3))))
    assert end[0]["choices"] == [] and end[0]["usage"]["total_tokens"] == 5
    assert end[-1] == "[DONE]"


def test_another_streams_chunks_are_not_shown_and_its_answer_is_an_error() -> None:
    # a redelivery answers afresh under another stream: its text would not add up with ours
    relay = StreamRelay("r1", 0, include_usage=False)
    shown = relay.take(chunk(0, "a", stream="first"))
    shown += relay.take(chunk(0, "x", stream="second"))
    shown += relay.take(chunk(1, "y", stream="second"))
    assert text_of(shown) == "a"
    (end,) = decoded(relay.finish(result(StreamMark(id="second", chunks=2))))
    assert end["error"]["code"] == "stream_interrupted"


def test_an_answer_with_chunks_missing_is_not_a_clean_end() -> None:
    relay = StreamRelay("r1", 0, include_usage=False)
    relay.take(chunk(0, "a"))
    (end,) = decoded(relay.finish(result(StreamMark(id="s1", chunks=2))))
    assert "error" in end


def test_a_stored_answer_is_shown_whole_as_one_chunk() -> None:
    relay = StreamRelay("r1", 0, include_usage=False)
    events = relay.finish(result(None, "whole answer"))
    assert text_of(events) == "whole answer" and events[-1] == DONE
    first = decoded(events)[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["finish_reason"] == "stop"


def test_an_error_after_chunks_is_an_error_event_without_done() -> None:
    relay = StreamRelay("r1", 0, include_usage=True)
    relay.take(chunk(0, "a"))
    error = ChatError(request_id="r1", code="stream_cut_off", message="broke", retryable=True)
    events = decoded(relay.finish(error))
    assert events == [
        {
            "error": {
                "message": "broke",
                "type": "upstream_error",
                "param": None,
                "code": "stream_cut_off",
            }
        }
    ]


@given(st.permutations(list(range(8))), st.lists(st.integers(0, 7), max_size=6))
def test_any_arrival_order_with_repeats_shows_each_chunk_once(
    order: list[int], repeats: list[int]
) -> None:
    relay = StreamRelay("r1", 0, include_usage=False)
    shown: list[bytes] = []
    for seq in [*order, *repeats]:
        shown += relay.take(chunk(seq, str(seq)))
    assert text_of(shown) == "01234567" and relay.shown == 8


async def test_chunk_stream_sends_the_first_delta_at_once_and_coalesces_the_rest() -> None:
    sent: list[StreamChunk] = []
    first_out = asyncio.Event()

    async def publish(c: StreamChunk) -> None:
        sent.append(c)
        first_out.set()

    stream = ChunkStream(publish, request_id="r1", stream_id="s", model="m", coalesce_s=0.05)
    stream.add(0, {"content": "Hel"})
    await asyncio.wait_for(first_out.wait(), 5)
    assert [c.choices[0]["delta"] for c in sent] == [{"role": "assistant", "content": "Hel"}]
    for piece in ("lo", " wor", "ld"):  # within one coalescing window: one chunk
        stream.add(0, {"content": piece})
    stream.add(0, {"finish_reason": "stop"})
    await asyncio.wait_for(stream.close(), 5)
    assert [c.seq for c in sent] == [0, 1]
    assert sent[1].choices[0]["delta"] == {"content": "lo world"}
    assert sent[1].choices[0]["finish_reason"] == "stop"
    assert stream.mark == StreamMark(id="s", chunks=2)


async def test_chunk_stream_merges_tool_call_pieces_and_logprobs_per_choice() -> None:
    sent: list[StreamChunk] = []

    async def publish(c: StreamChunk) -> None:
        sent.append(c)

    stream = ChunkStream(publish, request_id="r1", stream_id="s", model="m", coalesce_s=10)
    opening = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
    stream.add(1, {"tool_calls": [{**opening, "function": {"name": "f", "arguments": ""}}]})
    stream.add(1, {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]})
    stream.add(1, {"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]})
    stream.add(0, {"content": "x", "logprobs": [{"token": "x", "logprob": -0.1}]})
    stream.add(0, {"content": "y", "logprobs": [{"token": "y", "logprob": -0.2}]})
    await asyncio.wait_for(stream.close(), 5)  # closing sends at once, not after 10 s
    choices = {c["index"]: c for record in sent for c in record.choices}
    (call,) = choices[1]["delta"]["tool_calls"]
    assert call["id"] == "call_1" and call["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert choices[0]["delta"]["content"] == "xy"
    assert [e["token"] for e in choices[0]["logprobs"]["content"]] == ["x", "y"]


async def test_a_failed_publish_surfaces_at_close() -> None:
    async def publish(c: StreamChunk) -> None:
        raise ConnectionError("broker gone")

    stream = ChunkStream(publish, request_id="r1", stream_id="s", model="m")
    stream.add(0, {"content": "a"})
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(stream.close(), 5)


def test_a_long_answer_gathers_longer_so_its_records_stay_few() -> None:
    assert window_s(0.0) == window_s(0.2) == 0.015
    assert window_s(1.0) == pytest.approx(0.05)
    assert window_s(60.0) == MAX_COALESCE_S
    # a minute of tokens arriving every 10 ms: how many records go out
    t, records = 0.0, 0
    while t < 60.0:
        t += max(window_s(t), 0.01)
        records += 1
    assert 250 < records < 350
