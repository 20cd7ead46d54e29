"""The request-size limit on the real HTTP server (uvicorn + httptools), chunked uploads included."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.integration.stack import API_KEY, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_a_chunked_upload_over_the_limit_gets_a_413_and_is_not_kept(
    fast_stack: Stack,
) -> None:
    stack = fast_stack
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"model": "switchboard/auto", "messages": [{"role": "user", "content": "'
        chunk = b"x" * (1024 * 1024)
        for _ in range(256):  # 256 MiB offered; the limit is 8 MiB
            sent += 1
            yield chunk
        yield b'"}]}'

    # the router runs in this process: Python memory still allocated once the request is over
    # (after a collection) is what the server kept of the upload. RSS could not tell: the
    # allocator keeps freed pages, so a limit of tens of MiB hid an 8 MiB body kept for good.
    tracemalloc.start()
    try:
        gc.collect()
        traced_before = tracemalloc.get_traced_memory()[0]
        resp = await upload(stack, body())
        gc.collect()
        kept_mib = (tracemalloc.get_traced_memory()[0] - traced_before) / 2**20
    finally:
        tracemalloc.stop()
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "request_too_large"
    # The stack's other parts run in this process too: a Kafka consumer's fetch in flight at the
    # second reading holds up to 1 MiB (aiokafka's max_partition_fetch_bytes). A kept body would
    # be 8 MiB (the limit) or more.
    assert kept_mib < 4, f"{kept_mib:.1f} MiB kept of a {sent} MiB upload"


async def upload(stack: Stack, body: AsyncIterator[bytes]) -> httpx.Response:
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        try:
            return await client.post("/v1/chat/completions", content=body, headers=headers)
        except httpx.WriteError:
            pytest.fail("the server closed the upload without an answer")
