"""Feedback on the real broker and chDB: POST /v1/feedback and the feedback topic both end in
llm_feedback once the request is known and the tenant's; the rest is refused by name (HTTP) or
dead-lettered with its reason (Kafka); and the controller's window reads the scores per side."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from schemas.control import Feedback
from services.controller.adapters.figures import EndpointFigures
from services.controller.domain import accuracy_delta, z_of
from switchboard.embedded import free_port
from tests.integration.stack import (
    API_KEY,
    Infra,
    Stack,
    collect,
    produce,
    wait_until,
)

pytestmark = pytest.mark.integration

CONFIG = """
tiers:
  fast:
    interactive: true
    timeout_s: 10
    models:
      - {{model: openai/sim-light, name: sim-light, api_base: "{sim}/v1", price_as: gpt-4o-mini}}
default: fast
experiments:
  {name}:
    tier: fast
    share: 50
    steps: [50, 100]
    sticky: tenant
    interval_s: 3600
    criteria: [accuracy_delta >= 0]
    candidate: {{model: openai/sim-balanced-next, name: sim-balanced-next, api_base: "{sim}/v1",
                price_as: gpt-4.1-mini}}
"""


@pytest.fixture
async def stack(infra: Infra) -> AsyncIterator[tuple[Stack, str, int]]:
    name = f"fb-{infra.prefix}"
    path = infra.config(CONFIG.format(sim=infra.simulator_url, name=name))
    port = free_port()
    router = {"metrics_url": f"http://127.0.0.1:{port}", "feedback_wait_s": 1.0}
    async with infra.stack(path, ["fast"], router=router, metrics_port=port) as stack:
        yield stack, name, port


async def test_feedback_is_checked_stored_and_read_per_variant(
    stack: tuple[Stack, str, int],
) -> None:
    running, name, port = stack
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=running.base_url, headers=headers, timeout=30) as http:
        answered: list[tuple[str, str, str]] = []  # request id, tenant, model
        for i in range(16):
            body = {
                "model": "fast",
                "messages": [{"role": "user", "content": "Classify this ticket"}],
                "metadata": {"tenant": f"tenant-{i}"},
            }
            resp = await http.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            rid = resp.headers["x-switchboard-request-id"]
            answered.append((rid, f"tenant-{i}", resp.json()["model"]))
        models = {m for _, _, m in answered}
        assert models == {"sim-light", "sim-balanced-next"}, models  # both sides, by tenant

        # scores: the candidate's answers judged right, the tier's half right
        for rid, tenant, model in answered:
            score = 1.0 if model == "sim-balanced-next" else 0.5
            fb = {"request_id": rid, "tenant": tenant, "score": score, "comment": "checked"}
            resp = await http.post("/v1/feedback", json=fb)
            assert resp.status_code == 201, resp.text
            assert resp.json()["status"] == "recorded"

        rid, tenant, _ = answered[0]
        other = await http.post("/v1/feedback", json={"request_id": rid, "tenant": "x", "score": 1})
        assert other.status_code == 403 and other.json()["error"]["code"] == "tenant_mismatch"
        unknown = await http.post("/v1/feedback", json={"request_id": "sbr-nope", "score": 1})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"
        for bad, param in (
            ({"request_id": rid, "tenant": tenant, "score": 2}, "score"),
            ({"request_id": rid, "tenant": tenant, "scor": 1}, "scor"),
            ({"tenant": tenant, "score": 1}, "request_id"),
        ):
            resp = await http.post("/v1/feedback", json=bad)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
        nothing = await http.post("/v1/feedback", json={"request_id": rid, "tenant": tenant})
        assert nothing.status_code == 400 and "score" in nothing.json()["error"]["message"]
        no_tenant = {"request_id": rid, "score": 1}  # the request was made for a tenant
        assert (await http.post("/v1/feedback", json=no_tenant)).status_code == 403

    # the feedback topic takes the same records from any producer; the writer checks them too
    old = datetime.now(UTC) - timedelta(minutes=5)
    own = Feedback(request_id=rid, tenant=tenant, label="escalated", source="verifier:qa")
    theirs = Feedback(request_id=rid, tenant="someone-else", score=0.0, at=old)
    ghost = Feedback(request_id="sbr-ghost", score=0.0, at=old)
    await produce(
        running.bootstrap,
        running.topics.feedback,
        *(f.model_dump_json().encode() for f in (own, theirs, ghost)),
        b'{"request_id": "r", "score": "high"}',
    )
    letters = await collect(
        running.bootstrap,
        running.topics.dead_letter,
        lambda seen: sum(1 for d in seen if d["source_topic"] == running.topics.feedback) >= 3,
    )
    reasons = sorted(d["reason"] for d in letters if d["source_topic"] == running.topics.feedback)
    assert any("was not made for this tenant" in r for r in reasons), reasons
    assert any("no request 'sbr-ghost'" in r for r in reasons), reasons
    assert any(r.startswith("score:") for r in reasons), reasons

    async def stored() -> list[list[Any]] | None:
        _, rows = await running.metrics.store.query(
            "SELECT source, count(), countIf(label = 'escalated') FROM switchboard.llm_feedback"
            f" WHERE request_id IN ({', '.join(repr(r) for r, _, _ in answered)})"
            " GROUP BY source ORDER BY source"
        )
        return rows if sum(r[1] for r in rows) == 17 else None

    rows = await wait_until(stored, 30, "the feedback rows")
    assert [tuple(r) for r in rows] == [("api", 16, 0), ("verifier:qa", 1, 1)]

    # the controller's window: scores per side, and accuracy_delta from them
    figures = EndpointFigures(f"http://127.0.0.1:{port}", None, "switchboard", 30)
    try:
        window = await figures.window(name, "sim-balanced-next", 50.0, old)
    finally:
        await figures.close()
    candidates = sum(1 for _, _, m in answered if m == "sim-balanced-next")
    assert (window.candidate.feedback, window.candidate.score_mean) == (candidates, 1.0)
    assert (window.baseline.feedback, window.baseline.score_mean) == (16 - candidates, 0.5)
    assert accuracy_delta(window, z_of(0.95), None) == pytest.approx(0.5)
