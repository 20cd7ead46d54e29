"""Open-loop HTTP load generator: a fixed arrival rate, latency measured from the schedule.

``python -m bench.loadgen --url URL --rate R --duration S --body-file F [--header 'K: V']...``
``[--stream]`` POSTs the body ``R * S`` times and prints one JSON line (see ``summarise``). With
``--log FILE`` it also writes one JSON line per request as each one ends (see ``log_line``), so a
long run can be cut into time windows, and watched while it runs.

Open loop, so slow answers cannot hide themselves (no coordinated omission): request ``i`` is due
at ``t0 + i / rate`` whatever happened to earlier ones, each runs in its own task, the connection
pool has no limit, and latency runs from the *due* time to the last byte of the answer, so any
delay in the generator itself counts against the target rather than vanishing. The generator's
own lag (start of a request minus its due time) and its achieved send rate are reported, so a
generator that cannot keep up is visible in the figures instead of silently lowering the load.

A request that raises, answers anything but 200, or is not done ``timeout`` seconds after its due
time is an error. Latency percentiles cover the successful requests; errors are counted by kind.
Run it as its own process so its event loop shares nothing with whoever orchestrates the run.

With ``--stream`` the body is sent with ``"stream": true`` and ``stream_options.include_usage``,
and the answer is read as server-sent events as they arrive (``SseParser``, ``StreamTally``). Each
request then also records its time to first token (from its due time to the arrival of the first
event whose delta carries content), its events, and whether it ended with ``data: [DONE]``: an
error event, or an answer that ends without ``[DONE]`` or without any content, is an error. Its
latency is still the whole answer's. ``summarise_stream`` adds the TTFT percentiles and the events
per answer to the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from bench.common import percentile

DEFAULT_TIMEOUT_S = 10.0
# The first request is due this long after start, so scheduling begins on a quiet loop.
_LEAD_S = 0.02


@dataclass(frozen=True)
class LoadSpec:
    """One open-loop run: where, how fast, for how long, with what request."""

    url: str
    rate: float
    duration_s: float
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    warmup_s: float = 0.0
    stream: bool = False  # read the answer as server-sent events (the body asks for a stream)

    @property
    def measured(self) -> int:
        return round(self.rate * self.duration_s)

    @property
    def warmup(self) -> int:
        return round(self.rate * self.warmup_s)


@dataclass(frozen=True)
class StreamStats:
    """What one streamed answer carried; ``first_content`` in ``time.perf_counter()`` seconds."""

    first_content: float | None  # arrival of the first event whose delta carries content
    events: int  # data events, ``[DONE]`` not counted
    chunks: int  # of them, ``chat.completion.chunk`` events with choices
    content: int  # of those, the ones whose delta carries content
    done: bool  # ended with ``data: [DONE]``
    max_gap_s: float  # the longest wait between two events, from the first content event on


@dataclass(frozen=True)
class Outcome:
    """One request, its times in ``time.perf_counter()`` seconds.

    Not the loop's clock: uvloop's ``loop.time()`` ticks in whole milliseconds, too coarse for
    overheads of a few milliseconds.
    """

    due: float
    started: float
    finished: float
    error: str | None  # None: a 200 whose body was read in full (streamed: see StreamStats)
    stream: StreamStats | None = None  # a streamed request's events

    @property
    def latency_s(self) -> float:
        return self.finished - self.due

    @property
    def ttft_s(self) -> float | None:
        """From the due time to the first content event (streamed requests with content)."""
        if self.stream is None or self.stream.first_content is None:
            return None
        return self.stream.first_content - self.due

    @property
    def lag_s(self) -> float:
        return self.started - self.due


def log_line(outcome: Outcome, wall_offset_s: float, warmup: bool) -> str:
    """One request of ``--log``: ``due`` in Unix seconds (``wall_offset_s`` turns the
    ``perf_counter`` schedule into wall-clock time, so other processes' samples line up with it),
    latency in ms, ``error`` as in ``Outcome`` (null: a 200), and whether it was a warm-up one."""
    line: dict[str, Any] = {
        "due": round(outcome.due + wall_offset_s, 4),
        "latency_ms": round(outcome.latency_s * 1000, 3),
        "error": outcome.error,
        "warmup": warmup,
    }
    if outcome.stream is not None:  # streamed: also its TTFT (null: no content) and events
        ttft = outcome.ttft_s
        line.update(
            ttft_ms=None if ttft is None else round(ttft * 1000, 3), events=outcome.stream.events
        )
    return json.dumps(line)


def due_times(t0: float, rate: float, count: int) -> list[float]:
    """When each request is due: evenly spaced, fixed before the first one is sent."""
    return [t0 + i / rate for i in range(count)]


def _ms(value_s: float) -> float | None:
    """Milliseconds, rounded; ``None`` instead of NaN so the JSON stays valid."""
    return None if math.isnan(value_s) else round(value_s * 1000, 3)


def summarise(outcomes: Sequence[Outcome], rate: float) -> dict[str, Any]:
    """What one run measured: counts, latency percentiles, and how well the generator kept up.

    ``achieved_rps`` is requests started per second, from the first due time to the last actual
    start plus one interval: exactly ``rate`` when every request left on time, lower when the
    generator fell behind.
    """
    ok = sorted(o.latency_s for o in outcomes if o.error is None)
    lags = sorted(o.lag_s for o in outcomes)
    kinds = Counter(o.error for o in outcomes if o.error is not None)
    sent = len(outcomes)
    errors = sum(kinds.values())
    achieved = math.nan
    if outcomes:
        span = max(o.started for o in outcomes) - min(o.due for o in outcomes) + 1 / rate
        achieved = sent / span
    return {
        "rate": rate,
        "sent": sent,
        "ok": len(ok),
        "errors": errors,
        "error_rate": round(errors / sent, 5) if sent else None,
        "error_kinds": dict(sorted(kinds.items())),
        "p50_ms": _ms(percentile(ok, 50)),
        "p95_ms": _ms(percentile(ok, 95)),
        "p99_ms": _ms(percentile(ok, 99)),
        "max_ms": _ms(ok[-1] if ok else math.nan),
        "achieved_rps": None if math.isnan(achieved) else round(achieved, 2),
        "lag_p99_ms": _ms(percentile(lags, 99)),
        "lag_max_ms": _ms(lags[-1] if lags else math.nan),
    }


def summarise_stream(outcomes: Sequence[Outcome], rate: float) -> dict[str, Any]:
    """``summarise``, whose latency is the whole answer's, plus what streaming adds: TTFT
    percentiles and the events per answer (over the successful requests), the chunk events of
    every request (the failed ones' too: they were sent), and the longest pause inside an answer.
    """
    result = summarise(outcomes, rate)
    ok = [o for o in outcomes if o.error is None and o.stream is not None]
    ttft = sorted(o.ttft_s for o in ok if o.ttft_s is not None)
    gaps = sorted(o.stream.max_gap_s for o in ok if o.stream is not None)

    def mean(values: Sequence[int]) -> float | None:
        return round(sum(values) / len(values), 3) if values else None

    streams = [o.stream for o in ok if o.stream is not None]
    result.update(
        stream=True,
        ttft_p50_ms=_ms(percentile(ttft, 50)),
        ttft_p95_ms=_ms(percentile(ttft, 95)),
        ttft_p99_ms=_ms(percentile(ttft, 99)),
        ttft_max_ms=_ms(ttft[-1] if ttft else math.nan),
        events_per_answer=mean([s.events for s in streams]),
        chunks_per_answer=mean([s.chunks for s in streams]),
        content_per_answer=mean([s.content for s in streams]),
        chunks_total=sum(o.stream.chunks for o in outcomes if o.stream is not None),
        gap_max_p50_ms=_ms(percentile(gaps, 50)),
        gap_max_p99_ms=_ms(percentile(gaps, 99)),
    )
    return result


# --- streaming ---------------------------------------------------------------------------------


class SseParser:
    """Server-sent events from bytes that arrive in pieces of any size: ``feed`` returns the data
    of each event the piece completed (several ``data:`` lines joined by a newline, as the SSE
    spec says). Lines end in LF or CRLF; comments (``:``) and other fields are skipped."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, piece: bytes) -> list[str]:
        self._buffer += piece
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for raw in lines:
            line = raw.removesuffix(b"\r")
            if not line:  # a blank line ends the event
                if self._data:
                    events.append(b"\n".join(self._data).decode())
                    self._data = []
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                self._data.append(value.removeprefix(b" "))
        return events


def event_kind(data: str) -> str:
    """``done`` (``[DONE]``), ``error`` (an error event), ``content`` (a chunk whose delta
    carries text, reasoning or a tool call), ``chunk`` (any other chunk with choices), ``other``
    (the usage chunk, whose choices are empty), or ``bad`` (not a JSON object)."""
    if data.strip() == "[DONE]":
        return "done"
    try:
        body = json.loads(data)
    except ValueError:
        return "bad"
    if not isinstance(body, dict):
        return "bad"
    if "error" in body:
        return "error"
    choices = body.get("choices") or []
    for choice in choices:
        delta = (choice or {}).get("delta") or {}
        if any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls")):
            return "content"
    return "chunk" if choices else "other"


def error_code(data: str) -> str:
    """The ``code`` (else ``type``) of an error event, for counting errors by kind."""
    error = json.loads(data).get("error")
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "unknown")
    return "unknown"


class StreamTally:
    """Counts one streamed answer's events as they arrive (``take``), then judges it."""

    def __init__(self) -> None:
        self.first_content: float | None = None
        self.events = self.chunks = self.content = 0
        self.done = False
        self.failure: str | None = None  # an error event's code, or a malformed event
        self._last: float | None = None
        self.max_gap_s = 0.0

    def take(self, data: str, now: float) -> None:
        kind = event_kind(data)
        if kind == "done":
            self.done = True
            return
        self.events += 1
        if self._last is not None:
            self.max_gap_s = max(self.max_gap_s, now - self._last)
        if kind == "error":
            self.failure = self.failure or f"stream_error:{error_code(data)}"
        elif kind == "bad":
            self.failure = self.failure or "bad_event"
        elif kind in ("content", "chunk"):
            self.chunks += 1
            if kind == "content":
                self.content += 1
                if self.first_content is None:
                    self.first_content = self._last = now
        if self._last is not None:
            self._last = now

    def error(self) -> str | None:
        """Why the answer is not a clean one (None: it is): an error or malformed event, no
        ``[DONE]`` at the end, or no content at all."""
        if self.failure is not None:
            return self.failure
        if not self.done:
            return "no_done"
        if self.first_content is None:
            return "no_content"
        return None

    def stats(self) -> StreamStats:
        return StreamStats(
            self.first_content, self.events, self.chunks, self.content, self.done, self.max_gap_s
        )


def streaming_body(body: bytes) -> bytes:
    """The request body asking for a stream with its usage chunk."""
    request = json.loads(body)
    request.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(request).encode()


async def _one_stream(session: aiohttp.ClientSession, spec: LoadSpec, due: float) -> Outcome:
    started = time.perf_counter()
    tally = StreamTally()
    error: str | None = None
    try:
        async with asyncio.timeout(due + spec.timeout_s - started):
            async with session.post(spec.url, data=spec.body, headers=dict(spec.headers)) as resp:
                if resp.status != 200:
                    await resp.read()
                    error = f"http_{resp.status}"
                else:
                    parser = SseParser()
                    async for piece in resp.content.iter_any():
                        now = time.perf_counter()  # when these events arrived, not parsed
                        for data in parser.feed(piece):
                            tally.take(data, now)
                    error = tally.error()
    except TimeoutError:
        error = "timeout"
    except (aiohttp.ClientError, OSError) as exc:  # refused, reset, cut off mid-answer
        error = type(exc).__name__
    return Outcome(due, started, time.perf_counter(), error, tally.stats())


async def _one(session: aiohttp.ClientSession, spec: LoadSpec, due: float) -> Outcome:
    started = time.perf_counter()
    error: str | None = None
    try:
        async with asyncio.timeout(due + spec.timeout_s - started):
            async with session.post(spec.url, data=spec.body, headers=dict(spec.headers)) as resp:
                await resp.read()
                if resp.status != 200:
                    error = f"http_{resp.status}"
    except TimeoutError:
        error = "timeout"
    except (aiohttp.ClientError, OSError) as exc:  # refused, reset, disconnected, bad answer
        error = type(exc).__name__
    return Outcome(due, started, time.perf_counter(), error)


async def run_load(spec: LoadSpec, log_path: Path | None = None) -> dict[str, Any]:
    """Send ``spec``'s warm-up then measured requests on schedule; summarise the measured ones.

    Warm-up requests open the pool's connections at this rate and are not counted. Every task is
    awaited, so when this returns no request of this run is still in flight. With ``log_path``
    every request, warm-up ones included, gets a ``log_line`` there as soon as it ends.
    """
    total = spec.warmup + spec.measured
    wall_offset = time.time() - time.perf_counter()
    log = log_path.open("w", buffering=1) if log_path is not None else None
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
    one = _one_stream if spec.stream else _one
    try:
        # No client timeout: each request's deadline runs from its due time (asyncio.timeout_at).
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        ) as session:
            tasks: list[asyncio.Task[Outcome]] = []
            for i, due in enumerate(due_times(time.perf_counter() + _LEAD_S, spec.rate, total)):
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(session, spec, due))
                if log is not None:
                    task.add_done_callback(_logger(log, wall_offset, warmup=i < spec.warmup))
                tasks.append(task)
            outcomes = await asyncio.gather(*tasks)
    finally:
        if log is not None:
            log.close()
    measured = outcomes[spec.warmup :]
    if spec.stream:
        result = summarise_stream(measured, spec.rate)
        # the warm-up's chunks passed through the target too, inside the same CPU window
        result["warmup_chunks"] = sum(o.stream.chunks for o in outcomes[: spec.warmup] if o.stream)
    else:
        result = summarise(measured, spec.rate)
    result.update(
        url=spec.url,
        duration_s=spec.duration_s,
        warmup_s=spec.warmup_s,
        timeout_s=spec.timeout_s,
    )
    return result


def _logger(
    log: TextIO, wall_offset_s: float, warmup: bool
) -> Callable[[asyncio.Task[Outcome]], None]:
    def write(task: asyncio.Task[Outcome]) -> None:
        if task.cancelled() or task.exception() is not None:
            return  # the run itself fails on it, in gather
        log.write(log_line(task.result(), wall_offset_s, warmup) + "\n")

    return write


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds first")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--header", type=parse_header, action="append", default=[])
    parser.add_argument("--log", type=Path, help="write one JSON line per request here")
    parser.add_argument(
        "--stream", action="store_true", help="ask for a stream with usage; read it as SSE"
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    headers = {"content-type": "application/json", **dict(args.header)}
    body = args.body_file.read_bytes()
    spec = LoadSpec(
        url=args.url,
        rate=args.rate,
        duration_s=args.duration,
        body=streaming_body(body) if args.stream else body,
        headers=headers,
        timeout_s=args.timeout,
        warmup_s=args.warmup,
        stream=args.stream,
    )
    try:
        import uvloop  # a cheaper loop leaves more headroom before the generator lags
    except ImportError:
        result, loop_name = asyncio.run(run_load(spec, args.log)), "asyncio"
    else:
        result, loop_name = uvloop.run(run_load(spec, args.log)), "uvloop"
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(loop=loop_name, generator_cpu_s=round(usage.ru_utime + usage.ru_stime, 3))
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
