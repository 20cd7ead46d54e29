"""The request-size limit on the real HTTP server (uvicorn + httptools), chunked uploads included."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import psutil
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
        for _ in range(256):  # 256 MiB offered; the limit is 8 MiB
            sent += 1
            yield b"x" * (1024 * 1024)
        yield b'"}]}'

    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    # the router runs in this process: what it keeps of the upload shows in our RSS
    rss_before = psutil.Process().memory_info().rss
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        try:
            resp = await client.post("/v1/chat/completions", content=body(), headers=headers)
        except httpx.WriteError:
            pytest.fail(f"the server closed the upload without an answer after {sent} MiB")
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "request_too_large"
    kept_mib = (psutil.Process().memory_info().rss - rss_before) / 2**20
    assert kept_mib < 64, f"{kept_mib:.0f} MiB kept of a {sent} MiB upload"
