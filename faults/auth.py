"""Scenario 7, the auth matrix: who may call the router, and whether one tenant can reach
another's answer.

Every protected route is called with no key, malformed headers and a wrong key, with a valid
body and with an invalid one (the key is checked first: a caller without it learns nothing of the
request format); each must be a 401 in OpenAI's error shape. The only way the API hands back a
stored answer is an idempotency key, so two tenants send the same key with different prompts:
each must get an answer to its own prompt under its own request id, and a repeat by the first
tenant must get the first tenant's stored answer.
"""

from __future__ import annotations

from typing import Any

import httpx

from bench.common import Bench, RunningStack, routing_config, start_stack
from faults.common import Tally
from schemas.v1 import AUTO_MODEL

MODEL = "faults-auth"
PROFILE = {"ttft_s": 0.01, "tokens_per_s": 4000.0, "output_tokens": 8, "jitter": 0.0}

GOOD_BODY = {"model": AUTO_MODEL, "messages": [{"role": "user", "content": "hello"}]}
BAD_BODY = {"model": AUTO_MODEL, "messages": "not a list"}
HEADERS: dict[str, dict[str, str]] = {
    "no key": {},
    "empty header": {"authorization": ""},
    "scheme only": {"authorization": "Bearer"},
    "two spaces": {"authorization": "Bearer  sk-wrong"},
    "basic scheme": {"authorization": "Basic dXNlcjpwYXNz"},
    "key without scheme": {"authorization": "sk-whatever"},
    "wrong key": {"authorization": "Bearer sk-wrong"},
    "key in another header": {"x-api-key": "sk-wrong"},
}


def _openai_error(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "code"} <= error.keys()


def _matrix(client: httpx.Client, problems: list[str]) -> int:
    """Every unauthenticated call must be refused; returns how many got through."""
    through = 0
    calls: list[tuple[str, str, Any]] = [
        ("POST", "/v1/chat/completions", GOOD_BODY),
        ("POST", "/v1/chat/completions", BAD_BODY),
        ("GET", "/v1/models", None),
    ]
    for label, headers in HEADERS.items():
        for method, path, body in calls:
            response = client.request(method, path, json=body, headers=headers)
            if response.status_code != 401 or not _openai_error(response):
                through += 1
                problems.append(f"{label} {method} {path}: {response.status_code}")
    return through


def _ask(client: httpx.Client, key: str, tenant: str, prompt: str, idem: str) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={
            "model": AUTO_MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "metadata": {"tenant": tenant},
        },
        headers={"authorization": f"Bearer {key}", "idempotency-key": idem},
    )


def _text(response: httpx.Response) -> str:
    return str(response.json()["choices"][0]["message"]["content"])


def _tenants(client: httpx.Client, key: str, problems: list[str]) -> tuple[int, int]:
    """(leaks, failures) of two tenants sharing one idempotency key."""
    idem = "shared-key-1"
    first = _ask(client, key, "tenant-a", "alpha question about invoices", idem)
    second = _ask(client, key, "tenant-b", "beta question about parcels", idem)
    again = _ask(client, key, "tenant-a", "alpha question about invoices", idem)
    if any(r.status_code != 200 for r in (first, second, again)):
        problems.append(
            f"tenant calls answered {first.status_code}/{second.status_code}/{again.status_code}"
        )
        return 0, 1
    leaks = failures = 0
    a_id = first.headers["x-switchboard-request-id"]
    b_id = second.headers["x-switchboard-request-id"]
    if a_id == b_id or "alpha" in _text(second) or "beta" not in _text(second):
        leaks += 1
        problems.append("tenant-b got tenant-a's request id or answer")
    if again.headers["x-switchboard-request-id"] != a_id or _text(again) != _text(first):
        failures += 1
        problems.append("tenant-a's repeat was not its stored answer")
    return leaks, failures


def _scenario(stack: RunningStack) -> Tally:
    problems: list[str] = []
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        authorised = client.post(
            "/v1/chat/completions",
            json=GOOD_BODY,
            headers={"authorization": f"Bearer {stack.api_key}"},
        )
        if authorised.status_code != 200:
            problems.append(f"the right key got {authorised.status_code}")
        through = _matrix(client, problems)
        leaks, failures = _tenants(client, stack.api_key, problems)
    tally = Tally(leaked=through + leaks, lost=failures + (authorised.status_code != 200))
    cases = len(HEADERS) * 3
    tally.detail = (
        f"{cases} unauthenticated calls: {cases - through} refused with 401; two tenants on one "
        f"idempotency key: {'kept apart' if not leaks else 'LEAKED'}"
        + (f"; {'; '.join(problems)}" if problems else "")
    )
    return tally


def run(bench: Bench) -> Tally:
    sim_url = bench.simulator(profiles={MODEL: PROFILE})
    bootstrap = bench.broker()
    redis_url = bench.redis()
    config = routing_config(bench.work_dir / "auth.yaml", sim_url, MODEL)
    stack = start_stack(bench, config, bootstrap=bootstrap, redis_url=redis_url, metrics=False)
    return _scenario(stack)
