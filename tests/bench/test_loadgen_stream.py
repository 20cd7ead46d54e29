"""The load generator's streaming mode (``--stream``): reading server-sent events, judging each
answer, and the TTFT it reports. Pure parts first, then ``run_load`` against a small aiohttp
server in the test that streams as the simulator and Switchboard's router do; no stack started.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench.common import ROOT
from bench.loadgen import (
    LoadSpec,
    Outcome,
    SseParser,
    StreamStats,
    StreamTally,
    event_kind,
    log_line,
    run_load,
    streaming_body,
    summarise_stream,
)

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
TTFT_S = 0.05  # the test server's wait before its first content event


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


ROLE = chunk({"role": "assistant", "content": ""})
TEXT = chunk({"content": "Hello"})
FINISH = chunk({}, "stop")
USAGE = {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {"total": 3}}
INTERRUPTED = {"error": {"message": "cut", "type": "upstream_error", "code": "stream_interrupted"}}


def sse(body: dict[str, Any] | str) -> bytes:
    data = body if isinstance(body, str) else json.dumps(body)
    return f"data: {data}\n\n".encode()


CLEAN = b"".join(sse(e) for e in (ROLE, TEXT, TEXT, FINISH, USAGE, "[DONE]"))


# --- parsing -----------------------------------------------------------------------------------


def test_events_are_the_same_however_the_bytes_are_cut() -> None:
    whole = SseParser().feed(CLEAN)
    assert len(whole) == 6 and whole[-1] == "[DONE]"
    for cut in range(1, len(CLEAN)):
        parser = SseParser()
        assert parser.feed(CLEAN[:cut]) + parser.feed(CLEAN[cut:]) == whole
    one_byte = SseParser()
    assert [e for i in range(len(CLEAN)) for e in one_byte.feed(CLEAN[i : i + 1])] == whole


def test_crlf_multiline_data_comments_and_other_fields() -> None:
    raw = b': keep-alive\r\n\r\nevent: x\r\ndata: {"a":\r\ndata:1}\r\nid: 7\r\n\r\ndata: [DONE]\n\n'
    assert SseParser().feed(raw) == ['{"a":\n1}', "[DONE]"]


def test_an_event_without_its_blank_line_is_not_complete() -> None:
    parser = SseParser()
    assert parser.feed(b"data: [DONE]\n") == []
    assert parser.feed(b"\n") == ["[DONE]"]


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        ("[DONE]", "done"),
        (json.dumps(ROLE), "chunk"),  # the role chunk's empty content is no content
        (json.dumps(TEXT), "content"),
        (json.dumps(chunk({"reasoning_content": "hm"})), "content"),
        (
            json.dumps(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]})),
            "content",
        ),
        (json.dumps(FINISH), "chunk"),
        (json.dumps(USAGE), "other"),
        (json.dumps(INTERRUPTED), "error"),
        ("not json", "bad"),
        ("[1, 2]", "bad"),
    ],
)
def test_event_kinds(event: str, kind: str) -> None:
    assert event_kind(event) == kind


# --- judging one answer ------------------------------------------------------------------------


def tally(*events: tuple[dict[str, Any] | str, float]) -> StreamTally:
    t = StreamTally()
    for body, at in events:
        t.take(body if isinstance(body, str) else json.dumps(body), at)
    return t


def test_a_clean_answer_counts_its_events_and_its_first_content() -> None:
    t = tally(
        (ROLE, 1.0), (TEXT, 1.03), (TEXT, 1.10), (FINISH, 1.11), (USAGE, 1.11), ("[DONE]", 1.11)
    )
    assert t.error() is None
    stats = t.stats()
    # the first *content* sets TTFT, not the role chunk before it
    assert stats.first_content == 1.03
    assert (stats.events, stats.chunks, stats.content, stats.done) == (5, 4, 2, True)
    assert stats.max_gap_s == pytest.approx(0.07)  # between the two content events


@pytest.mark.parametrize(
    ("events", "error"),
    [
        # after a chunk, an error event and no [DONE]: the router's interrupted stream
        ([(TEXT, 1.0), (INTERRUPTED, 1.2)], "stream_error:stream_interrupted"),
        # an error event counts even if a [DONE] follows it
        ([(TEXT, 1.0), (INTERRUPTED, 1.2), ("[DONE]", 1.2)], "stream_error:stream_interrupted"),
        ([(TEXT, 1.0), (FINISH, 1.1)], "no_done"),  # cut off: no [DONE]
        ([(ROLE, 1.0), (FINISH, 1.0), ("[DONE]", 1.0)], "no_content"),
        ([(TEXT, 1.0), ("garbage", 1.0), ("[DONE]", 1.0)], "bad_event"),
        ([], "no_done"),  # a 200 with an empty body
    ],
)
def test_what_makes_a_streamed_answer_an_error(
    events: list[tuple[dict[str, Any] | str, float]], error: str
) -> None:
    assert tally(*events).error() == error


# --- summaries ---------------------------------------------------------------------------------


def streamed(
    due: float, first: float | None, end: float, error: str | None = None, chunks: int = 4
) -> Outcome:
    stats = StreamStats(first, chunks + 1, chunks, chunks - 2, error is None, 0.03)
    return Outcome(due, due, end, error, stats)


def test_ttft_runs_from_the_due_time_and_covers_successes_only() -> None:
    late = Outcome(0.0, 0.2, 0.6, None, StreamStats(0.25, 5, 4, 2, True, 0.03))
    result = summarise_stream(
        [
            late,
            streamed(1.0, 1.08, 1.35),
            streamed(2.0, 2.5, 2.6, "stream_error:stream_interrupted", chunks=2),
            streamed(3.0, None, 13.0, "timeout", chunks=0),
        ],
        rate=1,
    )
    # 250 ms: sent 200 ms late, then 50 ms to the first content; the generator's lag counts
    assert result["ttft_max_ms"] == pytest.approx(250.0)
    assert result["ttft_p50_ms"] == pytest.approx(80.0)
    assert result["p50_ms"] == pytest.approx(350.0)  # the whole answer
    assert result["error_kinds"] == {"stream_error:stream_interrupted": 1, "timeout": 1}
    assert result["chunks_per_answer"] == 4.0  # over the two clean answers
    assert result["chunks_total"] == 4 + 4 + 2  # every request's chunks went through
    assert result["stream"] is True


def test_a_run_with_no_clean_answer_still_summarises_to_valid_json() -> None:
    result = summarise_stream([streamed(0.0, None, 1.0, "no_done", chunks=1)], rate=1)
    assert result["ttft_p50_ms"] is None and result["events_per_answer"] is None
    json.dumps(result, allow_nan=False)


def test_the_streaming_body_asks_for_usage_and_keeps_the_rest() -> None:
    body = json.loads(streaming_body(BODY))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_a_streamed_request_logs_its_ttft() -> None:
    line = json.loads(log_line(streamed(1.0, 1.08, 1.35), wall_offset_s=100.0, warmup=False))
    assert line["ttft_ms"] == pytest.approx(80.0) and line["events"] == 5
    plain = json.loads(log_line(Outcome(1.0, 1.0, 1.1, None), 100.0, False))
    assert "ttft_ms" not in plain  # the non-streaming log is unchanged


# --- against a server --------------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """``/clean``: role, then after TTFT_S content, finish, usage, [DONE]; ``/interrupted``:
    a content event then an error event; ``/cut``: a content event, then the body ends;
    ``/fail``: a 500."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        body = json.loads(await request.read())
        assert body["stream"] is True and body["stream_options"]["include_usage"] is True
        if path == "fail":
            return web.json_response({"error": "boom"}, status=500)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(ROLE))
        await asyncio.sleep(TTFT_S)
        await resp.write(sse(TEXT))
        if path == "interrupted":
            await resp.write(sse(INTERRUPTED))
        elif path == "clean":
            for event in (TEXT, FINISH, USAGE, "[DONE]"):
                await resp.write(sse(event))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/{path}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


def stream_spec(url: str, rate: float = 50, duration_s: float = 0.2) -> LoadSpec:
    return LoadSpec(url, rate, duration_s, streaming_body(BODY), stream=True, warmup_s=0.1)


async def test_clean_streams_report_ttft_events_and_chunks(server: str) -> None:
    result = await run_load(stream_spec(f"{server}/clean"))
    assert (result["sent"], result["errors"]) == (10, 0)
    assert TTFT_S * 1000 <= result["ttft_p50_ms"] < result["p50_ms"]
    assert result["events_per_answer"] == 5  # role, 2 content, finish, usage; [DONE] apart
    assert result["chunks_per_answer"] == 4 and result["content_per_answer"] == 2
    assert result["chunks_total"] == 40 and result["warmup_chunks"] == 20


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("interrupted", "stream_error:stream_interrupted"),
        ("cut", "no_done"),
        ("fail", "http_500"),
    ],
)
async def test_broken_streams_are_errors_by_kind(server: str, path: str, kind: str) -> None:
    result = await run_load(stream_spec(f"{server}/{path}", duration_s=0.1))
    assert result["error_kinds"] == {kind: 5}
    assert result["ttft_p50_ms"] is None


async def test_cli_stream_flag_streams(server: str, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(BODY)  # no stream field: --stream adds it (the server asserts so)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        f"{server}/clean",
        "--rate",
        "50",
        "--duration",
        "0.2",
        "--body-file",
        str(body),
        "--stream",
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
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert (result["sent"], result["errors"], result["stream"]) == (10, 0, True)
    assert result["ttft_p50_ms"] >= TTFT_S * 1000
