"""Capture on the real broker and chDB: an opted-in tenant's prompts and answers land in
llm_payloads, redacted by the router (inputs) and the worker (outputs), over HTTP and the Kafka
ingress; nobody else's do; and the query endpoint answers about llm_payloads only when asked to."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from switchboard.embedded import free_port
from tests.integration.stack import API_KEY, Infra, Stack, produce, wait_until

pytestmark = pytest.mark.integration

CONFIG = """
tiers:
  fast:
    interactive: true
    models:
      - {{model: openai/sim-light, name: sim-light, api_base: "{sim}/v1", price_as: gpt-4o-mini}}
default: fast
capture:
  tenants: [acme]
"""
PII = "write to jane.doe@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111"


@pytest.fixture
async def stack(infra: Infra) -> AsyncIterator[tuple[Stack, int]]:
    path = infra.config(CONFIG.format(sim=infra.simulator_url))
    port = free_port()
    async with infra.stack(path, ["fast"], metrics_port=port) as running:
        yield running, port


async def payloads(stack: Stack, ids: list[str], count: int) -> list[list[Any]] | None:
    quoted = ", ".join(f"'{i}'" for i in ids)
    _, rows = await stack.metrics.store.query(
        "SELECT request_id, kind, model, text, redactions FROM switchboard.llm_payloads"
        f" WHERE request_id IN ({quoted}) ORDER BY request_id, kind"
    )
    return rows if len(rows) >= count else None


async def test_an_opted_in_tenant_is_captured_redacted_and_nobody_else(
    stack: tuple[Stack, int],
) -> None:
    running, port = stack
    headers = {"authorization": f"Bearer {API_KEY}"}
    ids: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=running.base_url, headers=headers, timeout=30) as http:
        for tenant in ("acme", "globex"):
            body = {
                "model": "fast",
                "messages": [{"role": "user", "content": f"{tenant}: {PII}"}],
                "metadata": {"tenant": tenant},
            }
            resp = await http.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            ids[tenant] = resp.headers["x-switchboard-request-id"]
    job = {
        "request_id": f"job-{running.topics.prefix}",
        "messages": [{"role": "user", "content": f"job: {PII}"}],
        "metadata": {"tenant": "acme"},
    }
    await produce(running.bootstrap, running.topics.ingress, json.dumps(job).encode())
    captured = [ids["acme"], job["request_id"]]
    rows = await wait_until(lambda: payloads(running, captured, 4), 60, "inputs and outputs")
    assert [(r[0], r[1]) for r in rows] == sorted(
        (i, k) for i in captured for k in ("input", "output")
    )
    for _, kind, model, text, redactions in rows:
        for secret in ("jane.doe@", "7946 0958", "4111"):
            assert secret not in text, (kind, text)
        if kind == "output":  # the simulator echoes the prompt's first 40 characters
            assert model == "sim-light" and "[EMAIL]" in text and redactions == {"email": 1}
        else:
            assert redactions == {"email": 1, "phone": 1, "card": 1}, redactions
            assert json.loads(text)["messages"][0]["content"].endswith("card [CARD]")
    # globex did not opt in: nothing of it is kept
    assert await payloads(running, [ids["globex"]], 1) is None

    # the query endpoint answers about llm_payloads only to a caller who asks for it by name
    sql = {"sql": "SELECT count() FROM switchboard.llm_payloads"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as metrics:
        refused = await metrics.post("/query", json=sql)
        assert refused.status_code == 403 and "--payloads" in refused.json()["error"]["message"]
        allowed = await metrics.post("/query", json=sql, headers={"x-switchboard-payloads": "read"})
        assert allowed.status_code == 200 and allowed.json()["rows"][0][0] >= 4
