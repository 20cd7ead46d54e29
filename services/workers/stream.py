"""A streamed answer's way to the router: the model's deltas, coalesced into ``StreamChunk``s.

The first delta goes out at once (the client's time to first token is the model's plus one
Kafka hop). Later ones are merged for ``coalesce_s`` into one record, longer as the answer goes
on (``window_s``), so a 1,000-token answer is tens of records, not a thousand: per choice the text pieces are joined, a tool call's
argument pieces are joined under its index, log-probability entries are appended.

Records are published one at a time, in order, numbered from 0 (``seq``) under this stream's id,
on the request's reply topic with its request id as key (the partition of its final outcome, so
the outcome follows the last chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from schemas.v1 import StreamChunk, StreamMark
from services.workers.adapters.llm import Delta

COALESCE_S = 0.015  # how long later deltas gather before they go out as one chunk
# A long answer gathers longer: after t seconds, t/STRETCH (at most MAX_COALESCE_S). A minute
# of tokens is then about 300 records instead of 4,000, and the stream still moves 4 times a
# second; the broker pays per record (docs/embedded-broker.md), and so do worker and router.
STRETCH = 20
MAX_COALESCE_S = 0.25


def window_s(elapsed_s: float, coalesce_s: float = COALESCE_S) -> float:
    """How long deltas gather once the stream has run ``elapsed_s``."""
    return min(MAX_COALESCE_S, max(coalesce_s, elapsed_s / STRETCH))


class ChunkStream:
    def __init__(
        self,
        publish: Callable[[StreamChunk], Awaitable[None]],
        *,
        request_id: str,
        stream_id: str,
        model: str,
        coalesce_s: float = COALESCE_S,
    ) -> None:
        self._publish = publish
        self.request_id, self.id, self.model = request_id, stream_id, model
        self._coalesce_s = coalesce_s
        self._pending: dict[int, dict[str, Any]] = {}  # merged choices by index, not yet sent
        self._begun: set[int] = set()  # choice indexes whose first delta went out (role sent)
        self._seq = 0  # the next chunk's number
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        """Has any delta been handed over? From then on the answer cannot change models."""
        return self._task is not None

    @property
    def mark(self) -> StreamMark:
        return StreamMark(id=self.id, chunks=self._seq)

    def add(self, index: int, delta: Delta) -> None:
        """Take one choice's delta (the model client's listener; runs in its loop, no await)."""
        choice = self._pending.get(index)
        if choice is None:
            choice = self._pending[index] = {
                "index": index,
                "delta": {},
                "logprobs": None,
                "finish_reason": None,
            }
            if index not in self._begun:
                self._begun.add(index)
                choice["delta"]["role"] = "assistant"
        _merge(choice, delta)
        if self._task is None:
            self._task = asyncio.create_task(self._send(), name=f"stream-{self.request_id}")
        self._wake.set()

    async def close(self) -> None:
        """Send what is pending and wait until every chunk is out; raises if a publish failed."""
        self._closing.set()
        self._wake.set()
        if self._task is not None:
            await self._task

    async def abort(self) -> None:
        """Stop sending (the call was cancelled or this worker stops): pending deltas are lost."""
        if self._task is None:
            return
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task  # a failed publish is moot now: nobody reads this stream

    async def _send(self) -> None:
        first = True
        began = asyncio.get_running_loop().time()
        while True:
            await self._wake.wait()
            if not first and not self._closing.is_set():
                # later deltas gather for a moment; closing sends what there is at once
                elapsed = asyncio.get_running_loop().time() - began
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._closing.wait(), window_s(elapsed, self._coalesce_s)
                    )
            first = False
            self._wake.clear()
            batch, self._pending = self._pending, {}
            if batch:
                chunk = StreamChunk(
                    request_id=self.request_id,
                    stream=self.id,
                    seq=self._seq,
                    model=self.model,
                    choices=[batch[i] for i in sorted(batch)],
                )
                await self._publish(chunk)
                self._seq += 1
            if self._closing.is_set() and not self._pending:
                return


def _merge(choice: dict[str, Any], delta: Delta) -> None:
    out = choice["delta"]
    for key in ("content", "reasoning_content"):
        if key in delta:
            out[key] = out.get(key, "") + delta[key]
    for piece in delta.get("tool_calls", ()):
        calls: list[dict[str, Any]] = out.setdefault("tool_calls", [])
        same = next((c for c in calls if c["index"] == piece["index"]), None)
        if same is None:
            calls.append({**piece, "function": dict(piece.get("function") or {"arguments": ""})})
            continue
        if "id" in piece:
            same.setdefault("id", piece["id"])
            same.setdefault("type", "function")
        function = piece.get("function") or {}
        merged = same.setdefault("function", {"arguments": ""})
        if "name" in function:
            merged.setdefault("name", function["name"])
        merged["arguments"] = merged.get("arguments", "") + function.get("arguments", "")
    if "logprobs" in delta:
        current = choice["logprobs"] or {"content": []}
        current["content"] = current["content"] + delta["logprobs"]
        choice["logprobs"] = current
    if "finish_reason" in delta:
        choice["finish_reason"] = delta["finish_reason"]
