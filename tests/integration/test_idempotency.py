"""Idempotency on the real stack: only final outcomes are served again, keys are scoped and bound
to the request's content (HTTP and the Kafka ingress). Real broker, Redis and simulator."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.integration.stack import API_KEY, Stack, collect, produce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def body(content: str = "Which queue takes refunds?", **metadata: Any) -> dict[str, Any]:
    return {
        "model": "fast",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "metadata": metadata,
    }


async def post(stack: Stack, payload: dict[str, Any], key: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as http:
        return await http.post(
            "/v1/chat/completions",
            json=payload,
            headers={"authorization": f"Bearer {API_KEY}", "idempotency-key": key},
        )


async def test_a_resend_after_a_504_gets_a_fresh_try(fast_stack: Stack) -> None:
    key = f"after-504-{uuid.uuid4().hex}"
    # a 1 ms budget has passed when the worker takes it: deadline_exceeded, a retryable outcome
    first = await post(fast_stack, body(deadline_ms=1), key)
    assert first.status_code == 504, first.text
    assert first.json()["error"]["code"] == "deadline_exceeded"
    again = await post(fast_stack, body(), key)  # same key, same request, no tight deadline
    assert again.status_code == 200, again.text
    third = await post(fast_stack, body(), key)  # now there is a final outcome: served again
    assert third.status_code == 200
    assert third.json()["choices"] == again.json()["choices"]
    assert fast_stack.workers["fast"].service.replayed == 1


async def test_a_key_reused_for_another_request_is_a_422_naming_the_header(
    fast_stack: Stack,
) -> None:
    key = f"reused-{uuid.uuid4().hex}"
    first = await post(fast_stack, body("first question"), key)
    assert first.status_code == 200, first.text
    other = await post(fast_stack, body("a different question"), key)
    assert other.status_code == 422, other.text
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    same = await post(fast_stack, body("first question"), key)
    assert same.status_code == 200 and same.json()["choices"] == first.json()["choices"]


async def test_over_kafka_a_reused_id_is_a_dead_letter_and_tenants_do_not_share_ids(
    fast_stack: Stack,
) -> None:
    stack, request_id = fast_stack, f"ingress-{uuid.uuid4().hex}"

    def job(content: str, tenant: str) -> bytes:
        message = {**body(content, tenant=tenant), "request_id": request_id}
        return json.dumps(message).encode()

    def answers_for(n: int) -> Any:
        return lambda ms: len([m for m in ms if m["request_id"] == request_id]) >= n

    await produce(stack.bootstrap, stack.topics.ingress, job("question", "acme"))
    await collect(stack.bootstrap, stack.topics.results, answers_for(1))
    # the same id from the same tenant asking something else: refused, not answered with the
    # first outcome
    await produce(stack.bootstrap, stack.topics.ingress, job("another question", "acme"))
    seen = await collect(stack.bootstrap, stack.topics.results, answers_for(2))
    mine = [m for m in seen if m["request_id"] == request_id]
    assert mine[0]["kind"] == "result"
    assert (mine[1]["kind"], mine[1]["code"]) == ("error", "idempotency_key_reused")
    letters = await collect(
        stack.bootstrap,
        stack.topics.dead_letter,
        lambda ms: any(request_id in m["payload"] for m in ms),
    )
    (letter,) = [m for m in letters if request_id in m["payload"]]
    assert letter["error_type"] == "KeyReused" and letter["source_topic"] == stack.topics.tier(
        "fast"
    )
    # another tenant using the same id gets its own answer
    await produce(stack.bootstrap, stack.topics.ingress, job("another question", "globex"))
    seen = await collect(stack.bootstrap, stack.topics.results, answers_for(3))
    mine = [m for m in seen if m["request_id"] == request_id]
    assert mine[2]["kind"] == "result" and mine[2]["tenant"] == "globex"
